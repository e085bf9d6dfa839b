"""How fast the offload engine's disk reader fills pinned staging buffers, against accelerate's loader.

CPU-only (no GPU needed): builds a checkpoint of a few large Llama layers in fp16, plans it fully on
disk, and times filling one layer's flat buffer (page cache warm) three ways: through accelerate's
`weights_map` (what its hooks do on every forward: open the file, copy the tensor out, convert),
straight from the memory-mapped safetensors file with one thread, and with READ_THREADS threads.

    python bench/disk_read.py [--hidden 2048] [--layers 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import make_tokenizer, save_checkpoint, tiny_llama_config  # noqa: E402
from pipeline.budgets import Budgets  # noqa: E402
from pipeline.engine import READ_THREADS, OffloadedLayer, _accelerate_sources, _layout  # noqa: E402
from pipeline.loading import load_model, unload  # noqa: E402
from pipeline.presets import resolve_model  # noqa: E402
from pipeline.speed import best_time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="disk-read-"))
    tok = make_tokenizer(root / "tok")
    config = tiny_llama_config(len(tok), layers=args.layers, hidden=args.hidden)
    save_checkpoint(config, root / "ckpt", tok, dtype=torch.float16)
    preset = resolve_model(str(root / "ckpt"))
    loaded = load_model(preset, Budgets((), 0, True, root / "offload"), engine="accelerate")
    layer_module = loaded.model.model.layers[1]
    specs, nbytes = _layout(layer_module)
    names = []
    for prefix, owner in layer_module.named_modules():
        names += [f"{prefix}.{n}" if prefix else n for n, _ in owner.named_parameters(recurse=False)]
    buffer = torch.empty(nbytes, dtype=torch.uint8)

    def layer_with(sources) -> OffloadedLayer:
        def read():
            for full, spec in zip(names, specs):
                yield spec, sources[full]()
        return OffloadedLayer(1, layer_module, "disk", specs, nbytes, read=read)

    # accelerate's path: the hook's weights_map, as its hooks read it on every forward.
    accelerate_sources = {}
    for prefix, owner in layer_module.named_modules():
        hook = getattr(owner, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        for n, _ in owner.named_parameters(recurse=False):
            full = f"{prefix}.{n}" if prefix else n
            accelerate_sources[full] = (lambda w=weights, n=n: w[n])
    direct_sources = _accelerate_sources(layer_module, {})
    pool = ThreadPoolExecutor(READ_THREADS)
    rows = [
        ("accelerate weights_map", best_time(lambda: layer_with(accelerate_sources).fill(buffer), 5)),
        ("safetensors map, 1 thread", best_time(lambda: layer_with(direct_sources).fill(buffer), 5)),
        (f"safetensors map, {READ_THREADS} threads", best_time(lambda: layer_with(direct_sources).fill(buffer, pool), 5)),
    ]
    pool.shutdown()
    print(f"# layer of hidden {args.hidden}: {nbytes / 1e6:.1f} MB fp16 · torch {torch.__version__} · "
          f"{torch.get_num_threads()} torch threads")
    for name, seconds in rows:
        print(f"{name:28} {seconds * 1000:8.1f} ms  {nbytes / seconds / 1e9:6.2f} GB/s")
    unload(loaded)


if __name__ == "__main__":
    main()
