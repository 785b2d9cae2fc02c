"""kiln.ir"""
