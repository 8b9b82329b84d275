"""Host memory of `from_pretrained(..., quantization_config=qlk.QlkConfig(...))` against a dense load.

Builds a Llama from a config (random bf16 weights, no download), saves it, then loads it in fresh
processes, dense and through QlkConfig, and reports from /proc/self/status (Linux):
* RssAnon growth: the process's own (anonymous) memory — what quantizing on load must keep near the
  quantized size;
* RssFile: pages of the mmapped safetensors file (page cache, shared and reclaimable; a dense load
  serves its weights from there, which is why its RSS looks small).

    python bench/load_memory.py [--hidden 1024 --layers 8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, torch, transformers
mode, path = sys.argv[1], sys.argv[2]
def status():
    out = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('RssAnon', 'RssFile', 'VmHWM'):
            out[k] = int(v.split()[0]) / 1024
    return out
kw = {}
if mode != "dense":
    import qlk
    kw["quantization_config"] = qlk.QlkConfig(bits=4, group_size=32)
s0 = status()
m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw)
s1 = status()
size = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / 2**20
print(json.dumps({"mode": mode, "model_mib": size, "anon_growth_mib": s1["RssAnon"] - s0["RssAnon"],
                  "rss_file_mib": s1["RssFile"], "peak_rss_mib": s1["VmHWM"]}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as d:
        cfg = transformers.LlamaConfig(
            hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
        )  # fmt: skip
        transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
        for mode in ("dense", "qlk-int4-g32"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, d], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['mode']:>14}: model {r['model_mib']:7.1f} MiB | own (anon) memory +{r['anon_growth_mib']:7.1f} MiB"
                  f" | mmapped file pages {r['rss_file_mib']:7.1f} MiB | peak RSS {r['peak_rss_mib']:7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
