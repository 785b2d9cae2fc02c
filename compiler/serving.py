"""Compile a Hugging Face causal LM into the serving graph and build the engine around it.

The model is captured from its own modeling code as a pure function of one flattened
batch, `model(input_ids=[1, T], position_ids=[1, T], use_cache=False)` with T symbolic
(dynamo + AOTAutograd, the same capture the torch.compile backend uses), then runs the
default pipeline plus the serving-only passes (serve.kv_cache: paged attention over the
runtime's KV-cache blocks). `PagedModelRunner` runs the result for the engine.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from kiln.ir import Graph, print_graph

from . import compile_cache
from .config import CompileOptions
from .driver import CapturedText, CompiledGraph, compile_graph

# How many serving captures this process ran (tests: loading an artifact must not capture).
CAPTURES = 0
EXAMPLE_TOKENS = 8


def capture_serving(model: torch.nn.Module, example_tokens: int = EXAMPLE_TOKENS,
                    extra_inputs: dict[str, torch.Tensor] | None = None) -> Graph:
    """The flat-batch forward of `model` as a kiln Graph (before any pass). `extra_inputs`:
    more per-token keyword arguments by name, each [1, example_tokens, ...] (an MTP module's
    hidden_states), graph inputs of that name with the same symbolic token count."""
    # Here, not at the top: a process that serves an artifact never captures, and importing
    # dynamo and AOTAutograd is ~1 s of its start (issue #16).
    from kiln.frontends.dynamo import (InputSpec, aot_module, describe_inputs, state_inputs,
                                       time_frames)
    from kiln.frontends.fx import from_fx
    global CAPTURES
    graphs: list[Graph] = []
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, example_tokens), device=device)
    pos = torch.arange(example_tokens, device=device)[None]
    known = state_inputs(model)
    known[id(ids)], known[id(pos)] = InputSpec("input_ids"), InputSpec("position_ids")
    extra = dict(extra_inputs or {})
    for name, t in extra.items():
        known[id(t)] = InputSpec(name)
        torch._dynamo.mark_dynamic(t, 1)

    def backend(gm, example_inputs):
        specs = describe_inputs(gm, example_inputs, known)

        def fw_compiler(fx_gm, fw_inputs):
            graphs.append(from_fx(fx_gm, specs))
            graphs[-1].meta["source"] = type(model).__name__
            return fx_gm   # this one call runs eagerly; the graph is all we wanted

        return aot_module(gm, example_inputs, fw_compiler)

    torch._dynamo.mark_dynamic(ids, 1)
    torch._dynamo.mark_dynamic(pos, 1)
    # transformers wraps every model's forward in one decorator: all models share one code
    # object and dynamo's recompile limit, so start from a clean slate.
    torch._dynamo.reset()
    time_frames()   # the reset dropped dynamo's timing callbacks
    fn = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        fn(input_ids=ids, position_ids=pos, use_cache=False, **extra)
    torch._dynamo.reset()
    if len(graphs) != 1:
        raise RuntimeError(f"serving capture produced {len(graphs)} graphs, expected 1")
    CAPTURES += 1
    return graphs[0]


def retarget_devices(graph: Graph, device: str) -> int:
    """Point device literals of a graph captured on one device (the CPU) at another."""
    dev = torch.device(device)
    changed = 0

    def fix(a):
        nonlocal changed
        if isinstance(a, torch.device) and a.type != dev.type:
            changed += 1
            return dev
        if isinstance(a, list):
            return [fix(x) for x in a]
        return a
    for n in graph.nodes:
        n.args = [fix(a) for a in n.args]
        n.attrs = {k: fix(a) for k, a in n.attrs.items()}
    return changed


def compile_serving(model: torch.nn.Module, target: str = "cpu", block_size: int = 16,
                    record: bool = False, steps=None, **options) -> CompiledGraph:
    """Capture + passes (serving) + wrapper: the graph a PagedModelRunner runs. `steps`
    (artifact.Steps) reports the capture and the compilation as two steps."""
    import contextlib
    step = steps or (lambda name: contextlib.nullcontext())
    with step("capture"):
        graph = cached_capture(model, compile_cache.enabled(options.get("cache", True)))
    with step("compile"):
        return _compile_captured(graph, target, block_size, record, options)


def cached_capture(model: torch.nn.Module, use_cache: bool = True) -> Graph | CapturedText:
    """`capture_serving(model)`, or, with the compile cache on, the text of the graph an
    earlier process captured from a model made of the same code, config, parameters and
    dtype (a "capture" entry, kiln.compile_cache; parsed only if the compile misses):
    capture is most of a cold compile on the CPU (dynamo and AOTAutograd, ~17 s of
    SmolLM2's ~21 s on 2 cores). A graph with lifted constants (data) is never stored."""
    what = capture_identity(model) if use_cache else None
    if what is None:
        return capture_serving(model)
    key = compile_cache.key_of("capture", what)
    files = compile_cache.load(key, "capture")
    if files is not None:
        return CapturedText(files[compile_cache.CAPTURED],
                            {"constants": {}, "source": type(model).__name__})
    graph = capture_serving(model)
    if not graph.meta["constants"]:
        compile_cache.store(key, {compile_cache.CAPTURED: print_graph(graph)},
                            {"model": type(model).__name__, "graph": graph.name,
                             "nodes": len(graph.nodes), "target": "-", "capture": True,
                             "weights": sum(p.numel() for p in model.parameters())}, "capture")
    return graph


def capture_identity(model: torch.nn.Module) -> dict | None:
    """What the serving capture of `model` depends on, for the cache key: the class and
    source file of every module in it, its config (public and private fields), every
    parameter's and buffer's name, shape and dtype, the device, and the transformers
    version; None (do not cache) when a module's code cannot be pinned: no source file,
    or a forward set on the instance."""
    import hashlib
    import inspect
    from pathlib import Path

    import transformers
    classes, sources = [], {}
    for name, module in model.named_modules():
        cls = type(module)
        if "forward" in vars(module):
            return None
        classes.append((name, f"{cls.__module__}.{cls.__qualname__}"))
        try:
            file = inspect.getsourcefile(cls)
        except TypeError:
            return None
        if file is None:
            return None
        if file not in sources:
            sources[file] = hashlib.sha256(Path(file).read_bytes()).hexdigest()
    config = model.config
    private = {k: v for k, v in vars(config).items()
               if k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
    state = [(n, list(t.shape), str(t.dtype)) for n, t in
             list(model.named_parameters(remove_duplicate=False))
             + list(model.named_buffers(remove_duplicate=False))]
    return {"modules": classes, "sources": sorted(sources.values()), "config": config.to_dict(),
            "config_private": private, "state": state,
            "device": next(model.parameters()).device.type, "example_tokens": EXAMPLE_TOKENS,
            "transformers": transformers.__version__}


def _compile_captured(graph: Graph | CapturedText, target, block_size, record,
                      options) -> CompiledGraph:
    opts = CompileOptions.make(options, target=target, serving=True, block_size=block_size,
                               record=record, cudagraphs=False)
    from kiln.backends.targets import get_target
    if get_target(target).device_type != "cpu":
        if isinstance(graph, CapturedText):
            graph = graph.parse()
        # torch_device(): npu's name exists only once torch_npu (or kiln) declared it,
        # which must follow the capture (dynamo's RNG forking asks for torch.npu).
        retarget_devices(graph, get_target(target).torch_device())
    return compile_graph(graph, opts)


def model_weights(model: torch.nn.Module, graph: Graph) -> dict[str, torch.Tensor]:
    """The tensors of the graph's weight inputs, by name: the model's parameters and
    buffers, and the constants the capture lifted."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    out.update(graph.meta.get("constants", {}))
    return out


@dataclass
class ServingConfig:
    max_model_len: int | None = None      # default: the model's, capped at 4096
    num_blocks: int | None = None         # default: from kv_cache_gib
    kv_cache_gib: float = 1.0             # KV-cache memory when num_blocks is not given
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    enable_prefix_caching: bool = True
    cudagraphs: bool = True               # targets with graph capture: replay steps from bucket graphs
    async_scheduling: bool | None = None  # None: on where the runner is on a GPU (EngineConfig)
    lazy_mixed_graphs: bool = False       # capture buckets with prefill chunks on first use
    background_graphs: bool = False       # capture while the engine is idle, not at start-up
    speculative: object = None            # runtime.spec_decode.SpeculativeConfig, or None: off
    # Decode rows computed as in a batch of one (GPU kernels): "verify" (speculation's verify
    # steps: greedy output identical to plain decoding), "all" (every step: a sequence's tokens
    # independent of its batch, slower at large batches) or "off".
    batch_invariant: str = "verify"


def default_max_model_len(config, cap: int = 4096) -> int:
    return min(getattr(config, "max_position_embeddings", cap) or cap, cap)


def make_runner(compiled_fn, graph: Graph, weights: dict, vocab_size: int, max_model_len: int,
                cfg: ServingConfig, device: str = "cpu"):
    from kiln.backends.targets import target_of_device
    from kiln.runtime.model_runner import (PagedModelRunner, cache_bytes_per_block, decode_buckets,
                                           graph_settings)
    graphs = graph_settings(target_of_device(torch.device(device).type), cfg.speculative)
    per_block = cache_bytes_per_block(graph)
    num_blocks = cfg.num_blocks
    if num_blocks is None:
        num_blocks = max(int(cfg.kv_cache_gib * 2**30 // per_block),
                         math.ceil(max_model_len / PagedModelRunner.block_size_of(graph)))
    return PagedModelRunner(compiled_fn, graph, weights, num_blocks=num_blocks,
                            max_model_len=max_model_len, vocab_size=vocab_size, device=device,
                            cudagraphs=cfg.cudagraphs and graphs["graph_api"] is not None,
                            seq_buckets=decode_buckets(cfg.max_num_seqs),
                            max_num_batched_tokens=cfg.max_num_batched_tokens,
                            batch_invariant=cfg.batch_invariant == "all", **graphs)


def make_engine(runner, tokenizer, cfg: ServingConfig, draft_runner=None):
    from kiln.runtime.engine import EngineConfig, LLMEngine
    return LLMEngine(runner, tokenizer, draft_runner=draft_runner, config=EngineConfig(
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_waiting=cfg.max_waiting, enable_prefix_caching=cfg.enable_prefix_caching,
        async_scheduling=cfg.async_scheduling, speculative=cfg.speculative,
        invariant_verify=cfg.batch_invariant != "off"))


# -- engines from a model or an artifact ------------------------------------------------------------
@dataclass
class Served:
    engine: object          # LLMEngine
    tokenizer: object
    model_name: str         # what clients pass as "model"
    source: str             # "artifact DIR" or "compiled MODEL"
    seconds: dict           # per step (load, capture, ...)
    quant: str | None = None   # the weights' quantisation (the compile option)


def device_of(target: str) -> str:
    from kiln.backends.targets import get_target
    return get_target(target).device_type


def _capture_graphs(runner, step, cfg: ServingConfig) -> None:
    if not runner.cudagraphs:
        return
    # (xpu and npu capture decode buckets only: runner.capture_prefill)
    mixed = [] if cfg.lazy_mixed_graphs or not runner.capture_prefill else runner.mixed_buckets()
    if cfg.background_graphs:   # ready now; the engine captures between requests
        runner.capture_later([(n, n) for n in runner.seq_buckets] + mixed)
        return
    graphs = f"{runner.graph_api.device_type.upper()} graphs"   # CUDA, XPU, NPU
    # Speculation's verify steps run in batch-invariant graphs of their own (at most
    # MAX_VERIFY_ROWS rows): captured now too, or a first verify step would stall for them.
    verify_rows = 0
    if cfg.speculative is not None and cfg.batch_invariant == "verify":
        from kiln.runtime.spec_decode import MAX_VERIFY_ROWS
        verify_rows = MAX_VERIFY_ROWS
    with step(f"capture {graphs} (decode buckets {', '.join(map(str, runner.seq_buckets))}"
              f"{'; verify buckets' if verify_rows else ''})"):
        runner.capture_decode_buckets(invariant_up_to=verify_rows)
    if mixed:
        with step(f"capture {graphs} ({len(mixed)} buckets with prefill chunks, up to "
                  f"{mixed[-1][0] if mixed else 0} tokens)"):
            runner.capture_mixed_buckets()


def build_served(source: str, cfg: ServingConfig, target: str = "cpu", dtype: str = "float32",
                 block_size: int = 16, steps=None, model_name: str | None = None,
                 trust_artifact: bool = False, tensor_parallel_size: int = 1,
                 quant: str | None = None, on_choice=None) -> Served:
    """`source` is an artifact directory (loaded, never recompiled) or a model spec (smollm2,
    an HF directory, a GGUF file: compiled in memory first). `trust_artifact` accepts an
    artifact kiln did not build on this machine (its wrapper runs; see kiln.artifact).
    `tensor_parallel_size` > 1: this process is rank 0 of that many (compiler.tensor_parallel).
    `quant` (a model compiled here): a mode, None / "none", or "auto" (kiln.quant_choice;
    `on_choice` gets the QuantChoice); an artifact keeps its own, and a mode that differs
    from it is an error."""
    from pathlib import Path

    from . import artifact as art
    step = steps or art.Steps(False)
    p = Path(source).expanduser()
    if tensor_parallel_size > 1:
        if quant not in (None, "auto", "none"):
            raise ValueError(f"--quant {quant} is not supported with --tensor-parallel-size "
                             f"yet; drop --quant (tensor-parallel ranks run unquantised weights)")
        return _build_served_tp(source, cfg, target, dtype, block_size, step, model_name,
                                tensor_parallel_size)
    if art.is_artifact(p):
        if cfg.speculative is not None and cfg.speculative.method == "layerskip":
            raise ValueError(f"--speculative {cfg.speculative} derives its draft graph from the "
                             f"model's capture, which artifact {p} does not keep: serve the model "
                             f"itself (kiln serve MODEL --speculative {cfg.speculative}), or use "
                             f"--speculative ngram:K with the artifact")
        if cfg.speculative is not None and cfg.speculative.method == "mtp":
            raise ValueError(f"--speculative {cfg.speculative} drafts with the model's MTP module "
                             f"and a serving graph that keeps each token's hidden state, which "
                             f"artifact {p} has neither of: serve the model itself (kiln serve "
                             f"MODEL --speculative {cfg.speculative}), or use --speculative "
                             f"ngram:K with the artifact")
        with step(f"load artifact {p}"):
            a = art.load_artifact(p, trust=trust_artifact)
            built = a.manifest["options"].get("quant")
            if quant not in (None, "auto") and (None if quant == "none" else quant) != built:
                raise ValueError(f"artifact {p} was compiled with weights {built or 'float32'}; "
                                 f"--quant {quant} needs a new artifact: kiln compile "
                                 f"{a.manifest['model']['spec']} -t {a.target} --quant {quant} "
                                 f"-o DIR (or drop --quant)")
            device = device_of(a.target)
            weights = a.load_weights("cpu")
            tok = a.tokenizer()
        max_len = cfg.max_model_len or min(a.manifest["serving"]["max_position_embeddings"] or 4096, 4096)
        with step("allocate KV cache"):
            runner = make_runner(a.fn, a.graph, weights, a.vocab_size, max_len, cfg, device)
        _capture_graphs(runner, step, cfg)
        name = model_name or Path(a.manifest["model"]["spec"]).name
        draft = draft_model_runner(cfg, runner, tok, str(source), target, dtype, block_size, step,
                                   quant, trust_artifact)
        return Served(make_engine(runner, tok, cfg, draft), tok, name, f"artifact {a.path}", step.seconds,
                      built)
    if p.is_dir() and not (p / "config.json").is_file():
        raise art.StaleArtifact(f"{p} is neither a kiln artifact (no {art.MANIFEST}) nor a model "
                                f"directory (no config.json); recompile with: kiln compile MODEL "
                                f"-t {target} -o {p}")
    chosen = []

    def note(choice):
        chosen.append(choice)
        if on_choice is not None:
            on_choice(choice)
    runner, tok, draft = _compiled_runner(source, cfg, target, dtype, block_size, step,
                                          device_of(target), on_choice=note, quant=quant)
    draft = draft or draft_model_runner(cfg, runner, tok, str(source), target, dtype, block_size,
                                        step, quant, trust_artifact)
    name = model_name or Path(str(source)).name
    return Served(make_engine(runner, tok, cfg, draft), tok, name, f"compiled {source}",
                  step.seconds, chosen[0].quant)


def _compiled_runner(source, cfg: ServingConfig, target, dtype, block_size, step, device,
                     on_choice=None, **options):
    """Load `source`, compile its serving graph (with `options`), allocate the runner and
    capture its graphs: (runner, tokenizer). options["quant"] may be "auto" or "none"
    (kiln.quant_choice, decided on the loaded model; `on_choice` gets the QuantChoice)."""
    from kiln.frontends import hf

    from .quant_choice import choose
    if cfg.speculative is not None and cfg.speculative.method == "mtp":
        from .mtp import mtp_runners   # the model with its MTP module: two graphs
        return mtp_runners(source, cfg, target, dtype, block_size, step, device, on_choice,
                           **options)
    with step(f"load {source}"):
        model, tok = hf.load(source, dtype=getattr(torch, dtype))
    choice = choose(options.get("quant"), model, target)
    options["quant"] = choice.quant
    if on_choice is not None:
        on_choice(choice)
    compiled = compile_serving(model, target=target, block_size=block_size, steps=step, **options)
    max_len = cfg.max_model_len or default_max_model_len(model.config)
    with step("allocate KV cache"):
        runner = make_runner(compiled.fn, compiled.graph, model_weights(model, compiled.graph),
                             model.config.vocab_size, max_len, cfg, device)
    _capture_graphs(runner, step, cfg)
    draft = None
    if cfg.speculative is not None and cfg.speculative.method == "layerskip":
        draft = layer_skip_runner(model, runner, cfg, target, block_size, step, device, options)
    return runner, tok, draft


def compile_layer_skip(model: torch.nn.Module, skipped: list[int], target: str = "cpu",
                       block_size: int = 16, record: bool = False, **options) -> CompiledGraph:
    """The serving graph of `model` without the decoder layers `skipped` (passes/spec.py's
    spec.draft on a copy of the capture): the draft graph of layerskip speculation."""
    from kiln.passes.spec import layer_skip_draft
    graph = cached_capture(model, compile_cache.enabled(options.get("cache", True)))
    graph = graph.parse() if isinstance(graph, CapturedText) else graph.copy()
    layer_skip_draft(graph, skipped)
    return _compile_captured(graph, target, block_size, record, options)


def layer_skip_runner(model, runner, cfg: ServingConfig, target, block_size, step, device, options):
    """The draft runner of `--speculative layerskip:K`: its graph compiled, its KV caches
    those of the full runner's kept layers (the draft's caches are numbered in layer order)."""
    from kiln.runtime.model_runner import PagedModelRunner, cache_inputs
    num_layers = model.config.num_hidden_layers
    skipped = cfg.speculative.skipped_layers(num_layers)
    with step(f"compile the layer-skip draft graph (skipping layers {skipped[0]}-{skipped[-1]} "
              f"of {num_layers})"):
        draft = compile_layer_skip(model, skipped, target, block_size, **options)
    kept = [i for i in range(num_layers) if i not in set(skipped)]
    names = [v.name for v in cache_inputs(draft.graph)]
    if len(names) != 2 * len(kept):
        raise ValueError(f"--speculative {cfg.speculative}: the draft graph has {len(names)} "
                         f"KV caches for {len(kept)} kept layers; layerskip supports models with "
                         f"one attention a layer")
    caches = {}
    for name in names:
        _, j, which = name.split(".")
        caches[name] = runner.caches[f"kv_cache.{kept[int(j)]}.{which}"]
    return PagedModelRunner(draft.fn, draft.graph, model_weights(model, draft.graph),
                            num_blocks=runner.num_blocks, max_model_len=runner.max_model_len,
                            vocab_size=runner.vocab_size, device=device,
                            seq_buckets=runner.seq_buckets, **runner.graph_options,
                            max_num_batched_tokens=cfg.max_num_batched_tokens, caches=caches)


def draft_model_runner(cfg: ServingConfig, target_runner, target_tokenizer, target_name: str,
                       target: str, dtype: str, block_size: int, step, quant: str | None = None,
                       trust_artifact: bool = False):
    """The draft runner of `--speculative draft:PATH:K` (None for any other method): PATH
    loaded as is when it is an artifact, else compiled as the target model is (the same
    target, dtype, --quant and block size). Its KV pool holds as many tokens as the
    target's, and its tokenizer must be the target's (the drafts are token ids)."""
    from pathlib import Path

    from kiln.frontends import hf
    from kiln.runtime.model_runner import PagedModelRunner
    from kiln.runtime.spec_decode import MAX_VERIFY_ROWS

    from . import artifact as art
    from .quant_choice import choose
    spec = cfg.speculative
    if spec is None or spec.method != "draft":
        return None
    path = Path(spec.draft_model).expanduser()
    device = str(target_runner.device)

    def draft_step(name):
        return step(f"draft model: {name}")
    if art.is_artifact(path):
        with draft_step(f"load artifact {path}"):
            a = art.load_artifact(path, trust=trust_artifact)
            if device_of(a.target) != torch.device(device).type:
                raise ValueError(f"--speculative {spec}: artifact {path} was compiled for "
                                 f"{a.target}, the target model runs on {device}; compile the "
                                 f"draft for it: kiln compile {a.manifest['model']['spec']} -t "
                                 f"{target} -o DIR")
            check_draft_tokenizer(a.tokenizer(), target_tokenizer, spec, target_name)
            fn, graph, weights, vocab_size = a.fn, a.graph, a.load_weights("cpu"), a.vocab_size
    else:
        with draft_step(f"load {spec.draft_model}"):
            try:
                model, tok = hf.load(spec.draft_model, dtype=getattr(torch, dtype))
            except ValueError as e:
                raise ValueError(f"--speculative {spec}: the draft model: {e}") from None
        check_draft_tokenizer(tok, target_tokenizer, spec, target_name)
        compiled = compile_serving(model, target=target, block_size=block_size, steps=draft_step,
                                   quant=choose(quant, model, target).quant)
        fn, graph, vocab_size = compiled.fn, compiled.graph, model.config.vocab_size
        weights = model_weights(model, compiled.graph)
    tokens = target_runner.num_blocks * target_runner.block_size
    # A step drafts for sequences verifying MAX_VERIFY_ROWS rows at most, two or more each:
    # no more run through the draft model at once, and its runner captures no larger buckets.
    draft_cfg = dataclasses.replace(
        cfg, speculative=None, num_blocks=math.ceil(tokens / PagedModelRunner.block_size_of(graph)),
        max_num_seqs=min(cfg.max_num_seqs, MAX_VERIFY_ROWS // 2))
    with draft_step("allocate KV cache"):
        runner = make_runner(fn, graph, weights, vocab_size, target_runner.max_model_len,
                             draft_cfg, device)
    _capture_graphs(runner, draft_step, draft_cfg)
    return runner


def check_draft_tokenizer(draft_tokenizer, target_tokenizer, spec, target_name: str) -> None:
    """A draft model proposes token ids: they must mean the same to the target model."""
    draft_vocab, target_vocab = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if draft_vocab == target_vocab:
        return
    differ = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()), key=lambda x: x[1])
    token, index = differ[0]
    where = "the draft's" if draft_vocab.get(token) == index else "the target's"
    raise ValueError(f"--speculative {spec}: the draft model {spec.draft_model} and the target "
                     f"model {target_name} have different tokenizers ({len(draft_vocab)} and "
                     f"{len(target_vocab)} tokens; id {index} is {token!r} in {where} only); "
                     f"draft with a model of the target's tokenizer (a smaller model of the same "
                     f"family), or use --speculative ngram:K")


def build_rank_runner(rank: int, size: int, source, cfg: ServingConfig, target, dtype, block_size,
                      step=None):
    """Rank `rank` of `size`: join the group, compile this rank's shard of the serving graph,
    allocate its KV cache (its heads) and capture its graphs: (runner, step group, tokenizer)."""
    import contextlib

    from .tensor_parallel import init_rank, rank_device
    step = step or (lambda name: contextlib.nullcontext())
    device_type = device_of(target)
    group = init_rank(rank, size, device_type)
    if cfg.speculative is not None and cfg.speculative.method != "ngram":
        raise ValueError(f"--speculative {cfg.speculative} is not supported with "
                         f"--tensor-parallel-size yet; use ngram:K")
    runner, tok, _ = _compiled_runner(source, cfg, target, dtype, block_size, step,
                                      rank_device(device_type), tensor_parallel_size=size,
                                      tensor_parallel_rank=rank)
    return runner, group, tok


def _build_served_tp(source, cfg: ServingConfig, target, dtype, block_size, step, model_name,
                     size: int) -> Served:
    from pathlib import Path

    from kiln.runtime.tensor_parallel import LeaderRunner

    from . import artifact as art
    from . import tensor_parallel as tp
    tp.check_size(size, device_of(target))
    if art.is_artifact(Path(source).expanduser()):
        raise ValueError(f"{source} is an artifact, compiled for one device; with "
                         f"--tensor-parallel-size {size}, serve the model itself (kiln serve MODEL "
                         f"--tensor-parallel-size {size}) and every rank compiles its shard")
    if cfg.background_graphs:
        raise ValueError("--background-graphs captures between requests on one rank; with "
                         "--tensor-parallel-size every rank captures at start-up: leave it out")
    if cfg.async_scheduling:
        raise ValueError("async scheduling reads the sampled tokens on rank 0's device; with "
                         "--tensor-parallel-size leave it to the default (off)")
    build = (source, cfg, target, dtype, block_size)
    followers = [] if tp.launched() else tp.spawn_followers(size, build)
    runner, group, tok = build_rank_runner(0, size, *build, step=step)
    leader = LeaderRunner(runner, group, size, followers)
    import atexit
    atexit.register(leader.close)
    name = model_name or Path(str(source)).name
    return Served(make_engine(leader, tok, cfg), tok, name,
                  f"compiled {source} on {size} ranks (tensor parallel)", step.seconds)
