"""kiln.frontends"""
