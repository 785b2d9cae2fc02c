"""Every AOT kernel compiles for cuda sm_90 (cubin) and hip gfx942 (hsaco) on this
CPU-only machine, in variants that cover every constexpr value and argument type (see
`suite_work`), with TRITON_INTERPRET set or not (compilation then runs in child
processes started without it)."""
from __future__ import annotations

import json
import os
import time

import pytest

from kiln.backends.triton import aot

ELF = b"\x7fELF"


def _footprint(spec) -> int:
    """Tile elements times pipeline stages: what a variant's shared memory grows with."""
    tiles = 1
    for name, value in spec.constants.items():
        if name.startswith("BLOCK") and isinstance(value, int):
            tiles *= value
    return tiles * spec.num_stages


def _features(spec) -> set:
    """What one compilation of a spec exercises: each constexpr's value, each argument's
    type (the element types of its loads, stores and dots), its warps and stages."""
    return ({("constexpr", k, repr(v)) for k, v in spec.constants.items()}
            | {("arg", k, v) for k, v in spec.signature.items() if v != "constexpr"}
            | {("num_warps", spec.num_warps), ("num_stages", spec.num_stages),
               ("divisible_by_16", repr(spec.divisible_by_16))})


def suite_work(specs) -> list:
    """The (spec, target) compilations this suite runs: for each kernel and target, the
    variant with the largest tiles (what the hip LDS check below must see), then, greedily,
    variants until every value of every constexpr, every argument type, and every warp and
    stage count among that kernel's variants for that target has been compiled at least
    once. That is 87 of the 264 compilations: each code path a constexpr selects compiles
    for both targets, though not in every combination with the others. All 264 took ~300 s
    of the 2-core CI's 15 minutes; KILN_AOT_TEST=all compiles them all."""
    if os.environ.get("KILN_AOT_TEST") == "all":
        return [(s, t) for s in specs for t in ("cuda", "hip") if t in s.targets]
    groups: dict = {}
    for s in specs:
        for t in s.targets:
            groups.setdefault((s.fn, t), []).append(s)
    work = []
    for (_, target), variants in groups.items():
        variants = sorted(variants, key=_footprint, reverse=True)
        todo = set().union(*map(_features, variants))
        chosen = variants[0]
        while todo:
            todo -= _features(chosen)
            work.append((chosen, target))
            chosen = max(variants, key=lambda s: len(_features(s) & todo))
    return work


@pytest.fixture(scope="module")
def compiled():
    work = suite_work(aot.all_specs())
    start = time.perf_counter()
    results = aot.compile_pairs(work, jobs=os.cpu_count(), raise_on_error=False)
    wall = time.perf_counter() - start
    print(f"\nAOT: {len(results)} compilations in {wall:.1f} s")
    return work, results


def test_every_kernel_compiles_for_cuda_and_hip(compiled):
    work, results = compiled
    assert work, "no AOT specs found"
    failures = {}
    for (spec, target), res in zip(work, results):
        if isinstance(res, str):
            failures[(spec.name, target)] = res
        elif not res.binary.startswith(ELF):
            failures[(spec.name, target)] = f"binary is not ELF ({len(res.binary)} bytes)"
        else:
            assert aot.binary_bytes(res, target) == res.binary
            assert res.target == target and res.kernel_name
    if failures:
        raise aot.AotCompileError(failures)


def test_every_hip_kernel_fits_mi300_lds(compiled):
    """Triton compiles a kernel for gfx942 whatever LDS it asks for; a launch on an MI300
    would refuse one past its 64 KiB (the H100 tile tables asked up to 160 KiB): the hip
    tile tables (kiln.backends.triton.tiles) must keep every hip variant within it."""
    from kiln.backends.triton.tiles import HIP_LDS_BYTES
    work, results = compiled
    over = {spec.name: res.metadata.get("shared") for (spec, target), res in zip(work, results)
            if target == "hip" and not isinstance(res, str)
            and res.metadata.get("shared", 0) > HIP_LDS_BYTES}
    assert not over, f"hip kernels past MI300's {HIP_LDS_BYTES} bytes of LDS: {over}"


def test_the_suite_compiles_every_variant_feature_for_both_targets():
    specs = aot.all_specs()
    work = suite_work(specs)
    assert len(set((s.name, t) for s, t in work)) == len(work)
    every = [(s, t) for s in specs for t in ("cuda", "hip") if t in s.targets]
    assert len(work) < len(every) / 2
    for fn, target in {(s.fn, t) for s, t in every}:
        variants = [s for s, t in every if s.fn is fn and t == target]
        chosen = [s for s, t in work if s.fn is fn and t == target]
        assert max(map(_footprint, variants)) == max(map(_footprint, chosen))
        assert set().union(*map(_features, chosen)) == set().union(*map(_features, variants))


def test_specs_are_well_formed():
    specs = aot.all_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for s in specs:
        assert list(s.signature) == list(s.fn.arg_names), s.name
        const = {k for k, v in s.signature.items() if v == "constexpr"}
        assert const == set(s.constants), s.name
    # The pointwise modules ship fp16 and bf16 variants of each kernel.
    for kind in ("rms_norm_", "fused_add_rms_norm_", "rope_", "silu_mul_", "quant_",
                 "rms_norm_quant_", "silu_mul_quant_"):
        mine = [n for n in names if n.startswith(kind)]
        assert any("_f16_" in n for n in mine) and any("_bf16_" in n for n in mine), kind


def test_every_kernel_has_a_spec():
    """A `*_kernel` added to a kernel module without an AOT spec would escape the compile
    test above; helpers (@triton.jit functions the kernels call) need none."""
    import importlib

    import triton
    specced = {s.fn for s in aot.all_specs()}
    missing, kernels = [], set()
    for mod in aot.KERNEL_MODULES:
        module = importlib.import_module(f"kiln.backends.triton.{mod}")
        for name, obj in vars(module).items():
            # KernelInterface: a JITFunction, or an InterpretedFunction under TRITON_INTERPRET
            if isinstance(obj, triton.runtime.jit.KernelInterface) and name.endswith("_kernel"):
                kernels.add(obj)
                if obj not in specced:
                    missing.append(f"{mod}.{name}")
    assert not missing, f"kernels without an AOT spec: {missing}"
    assert kernels == specced   # (kernels imported from a sibling module count once)


def test_make_spec_rejects_untyped_parameters():
    from kiln.backends.triton import norm
    with pytest.raises(ValueError, match="without a type"):
        aot.make_spec("bad", norm._rms_norm_kernel, {"X": "*fp16"}, {})


def test_compile_one_spec_and_write_artifacts(compiled, tmp_path):
    work, results = compiled
    spec = next(s for s in aot.all_specs() if s.name == "rms_norm_f16_d4096")
    one = aot.compile_spec(spec, "hip")  # goes through a child process under the interpreter
    assert one.binary.startswith(ELF) and one.spec_name == spec.name
    ok = [r for r in results if not isinstance(r, str)][:4]
    out = aot.write_artifacts(ok, str(tmp_path / "aot"))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert [m["spec"] for m in manifest] == [r.spec_name for r in ok]
    for m in manifest:
        with open(os.path.join(out, m["file"]), "rb") as f:
            assert f.read(4) == ELF
