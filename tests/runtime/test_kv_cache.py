"""Block manager: allocation, reference counts, prefix hits, LRU eviction of cached blocks."""
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.sequence import SamplingParams, Sequence


def seq(tokens):
    return Sequence(list(tokens), SamplingParams())


def run_prefill(bm: BlockManager, s: Sequence) -> None:
    """Admit a sequence and pretend the model computed all of its tokens."""
    bm.match_prefix(s)
    assert bm.allocate(s, s.num_pending)
    s.num_computed = s.num_tokens
    bm.commit(s)


def test_allocate_and_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_used_blocks() == 3 and bm.num_free_blocks() == 5
    a.num_computed = 10
    assert bm.allocate(a, 2) and len(a.block_table) == 3      # fits in the last block
    assert bm.allocate(a, 3) and len(a.block_table) == 4
    assert len(set(a.block_table)) == 4
    bm.free_seq(a)
    assert bm.num_used_blocks() == 0 and not a.block_table and a.num_computed == 0


def test_allocate_fails_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq(range(12))
    assert not bm.allocate(a, 12)
    assert not a.block_table and bm.num_free_blocks() == 2
    assert bm.allocate(a, 8) and bm.num_free_blocks() == 0


def test_prefix_hit_shares_blocks_with_refcounts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(10))
    run_prefill(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2] and b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    assert bm.allocate(b, b.num_pending) and len(b.block_table) == 3
    assert bm.num_used_blocks() == 4
    bm.free_seq(a)
    assert bm.num_used_blocks() == 3      # the shared blocks live on in b
    bm.free_seq(b)
    assert bm.num_used_blocks() == 0
    assert bm.query_tokens == 21 and bm.hit_tokens == 8


def test_freed_blocks_stay_cached_and_chain_matters():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12))
    run_prefill(bm, a)
    bm.free_seq(a)
    c = seq(list(range(12)) + [99])
    assert bm.match_prefix(c) == 12        # revived from the free list
    assert bm.num_used_blocks() == 3
    d = seq([100, 101, 102, 103] + list(range(4, 12)) + [1])
    assert bm.match_prefix(d) == 0         # same second block, different prefix: no hit


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, seq(range(8)))
    again = seq(range(8))
    assert bm.match_prefix(again) == 4     # the block with the last token is recomputed
    assert again.num_pending == 4


def test_lru_eviction_of_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(range(8)), seq(range(20, 28))
    run_prefill(bm, a)
    run_prefill(bm, b)
    bm.free_seq(a)                          # a freed first: evicted first
    bm.free_seq(b)
    c = seq(range(40, 48))
    assert bm.allocate(c, 8)               # takes a's two blocks
    assert bm.match_prefix(seq(list(range(8)) + [1])) == 0
    assert bm.match_prefix(seq(list(range(20, 28)) + [1])) == 8


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(8))
    run_prefill(bm, a)
    bm.free_seq(a)
    partial = seq(range(50, 53))          # 3 tokens: its block is never hashed
    assert bm.allocate(partial, 3)
    bm.free_seq(partial)
    x = seq(range(60, 64))
    assert bm.allocate(x, 4)
    assert bm.match_prefix(seq(list(range(8)) + [1])) == 8   # a's blocks survived


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(range(9))
    run_prefill(bm, a)
    bm.free_seq(a)
    assert bm.match_prefix(seq(range(9))) == 0
