"""The GPU check: real-size registry architectures with random weights, no download.

Builds the DeepSeek-Coder-1.3B and StarCoder2-3B architectures from the ``config.json`` files
shipped in ``codedistill/assets/model_configs/`` (``AutoModelForCausalLM.from_config``, random
weights) and measures, on one device:

* the HF backend (codedistill's ``HFGenerator.sample``, greedy) tokens/s and peak memory;
* one LoRA fine-tuning step (r 16 on the family's registry targets, AdamW) with and without
  gradient checkpointing: seconds and peak memory;
* one QLoRA step (4-bit NF4 base) where bitsandbytes imports and CUDA is there;
* ``models/preflight.py``'s memory estimate (inference, lora) against the measured peak.

The tokenizer is a word-level one over exactly the architecture's vocabulary (``t0 t1 ...``),
so every generated id decodes; prompts are fixed random token strings. On a GPU everything
runs in bfloat16; ``--tiny`` scales every architecture down (hidden 64, 2 layers, vocabulary
512) and runs in float32 on CPU in well under a minute, so the check runs in CI and cannot rot.

    python benchmarks/gpu_check.py [--tiny] [--models DeepSeek-Coder-1.3B,StarCoder2-3B]
        [--prompts 8] [--prompt-tokens 256] [--max-new-tokens 128] [--batch 8] [--seq 512] [--json out.json]

Prints a table and a JSON object (device name, settings, one record per model and phase).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from importlib.resources import files
from typing import Any, Callable

from codedistill.models.preflight import count_parameters, memory_needed
from codedistill.models.registry import LORA_TARGETS

MODELS = ("DeepSeek-Coder-1.3B", "StarCoder2-3B")
GB = 2**30


def shipped_config(alias: str) -> dict[str, Any]:
    """The registry model's architecture config shipped with the package."""
    return json.loads(files("codedistill").joinpath("assets", "model_configs", f"{alias}.json").read_text())


def tiny_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same architecture at toy size: every width, depth and vocabulary scaled down."""
    c = dict(config)
    heads = 4
    kv = heads if c.get("num_key_value_heads") == c.get("num_attention_heads") else 2
    c.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
             num_key_value_heads=kv, vocab_size=512, max_position_embeddings=2048,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if "sliding_window" in c and c["sliding_window"]:
        c["sliding_window"] = 256
    return c


def word_tokenizer(vocab_size: int) -> Any:
    """A real fast tokenizer with exactly ``vocab_size`` tokens: ``t0`` .. ``t{n-1}``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3")


class Meter:
    """Peak memory of one phase: CUDA's allocator peak on a GPU, the process's peak RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> "Meter":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.seconds = time.perf_counter() - self.t0


def build(config: dict[str, Any], device: str, dtype: Any) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def measure_generation(model: Any, tok: Any, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import random

    from codedistill.generation.hf import HFGenerator

    rng = random.Random(0)
    vocab = len(tok)
    prompts = [" ".join(f"t{rng.randrange(4, vocab)}" for _ in range(args.prompt_tokens)) for _ in range(args.prompts)]
    gen = HFGenerator(model.eval(), tok, name="gpu-check", batch_size=args.prompts)
    gen.sample(prompts[:1], 1, temperature=0.0, max_new_tokens=4)  # warm-up (kernels, allocator)
    gen.generated_tokens = 0
    with Meter(device) as m:
        gen.sample(prompts, 1, temperature=0.0, max_new_tokens=args.max_new_tokens)
    return {"phase": "hf_generate", "seconds": round(m.seconds, 3), "tokens": gen.generated_tokens,
            "tokens_per_s": round(gen.generated_tokens / m.seconds, 1), "peak_gb": round(m.peak / GB, 3),
            "prompts": args.prompts, "prompt_tokens": args.prompt_tokens}


def lora_step(model: Any, family: str, args: argparse.Namespace, device: str, checkpointing: bool,
              phase: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS.get(family, ["all-linear"])
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                  target_modules=targets if targets != ["all-linear"] else "all-linear"))
    if checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    with Meter(device) as m:
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.config.use_cache = True
    peft_model.unload()  # the base model without adapters, for the next phase
    return {"phase": phase, "seconds": round(m.seconds, 3), "peak_gb": round(m.peak / GB, 3),
            "loss": round(float(loss.detach()), 4), "trainable_params": trainable,
            "tokens_per_s": round(args.batch * args.seq / m.seconds, 1)}


def qlora_step(config: dict[str, Any], family: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same step on a 4-bit NF4 base: the random model saved once, reloaded quantised."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as tmp:
        build(config, "cuda", torch.bfloat16).save_pretrained(tmp)
        torch.cuda.empty_cache()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map={"": 0},
                                                     dtype=torch.bfloat16)
    return lora_step(model, family, args, "cuda", checkpointing=True, phase="qlora_step_gc")


def bitsandbytes_imports() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # missing, or no CUDA build
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None


def check_model(alias: str, args: argparse.Namespace, device: str, record: Callable[[dict], None]) -> None:
    import torch

    config = shipped_config(alias)
    if args.tiny:
        config = tiny_config(config)
    family = {"starcoder2": "starcoder2", "llama": "llama", "qwen2": "qwen2"}.get(config["model_type"], "auto")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dtype_name = "bfloat16" if device == "cuda" else "float32"
    params = count_parameters(config)
    tok = word_tokenizer(config["vocab_size"])
    model = build(config, device, dtype)
    actual = sum(p.numel() for p in model.parameters())
    base = {"model": alias, "dtype": dtype_name, "params": actual, "params_preflight": params}
    gen = measure_generation(model, tok, args, device)
    gen["preflight_gb"] = round(memory_needed(params, dtype_name, "inference") / GB, 3)
    record({**base, **gen})
    for gc in (False, True):
        step = lora_step(model, family, args, device, gc, "lora_step_gc" if gc else "lora_step")
        step["preflight_gb"] = round(memory_needed(params, dtype_name, "lora") / GB, 3)
        record({**base, **step})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
        why = bitsandbytes_imports()
        if why is None:
            record({**base, **qlora_step(config, family, args)})
        else:
            record({**base, "phase": "qlora_step_gc", "skipped": f"bitsandbytes does not import ({why})"})


def pick_device(tiny: bool) -> tuple[str, str]:
    """(device, its name): the first GPU unless ``tiny``, else the CPU."""
    import platform

    import torch

    if torch.cuda.is_available() and not tiny:
        return "cuda", torch.cuda.get_device_name(0)
    return "cpu", f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("model", "phase", "dtype", "seconds", "tokens_per_s", "peak_gb", "preflight_gb")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(str(r.get(c, r.get("skipped", "") if c == "seconds" else "")) for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CI, CPU)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompts", type=int, default=None, help="prompts in one generate call (default 8; tiny 2)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 256; tiny 16)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="(default 128; tiny 8)")
    ap.add_argument("--batch", type=int, default=None, help="LoRA step: sequences (default 8; tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="LoRA step: tokens per sequence (default 512; tiny 32)")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    defaults = dict(prompts=(2, 8), prompt_tokens=(16, 256), max_new_tokens=(8, 128), batch=(2, 8), seq=(32, 512))
    for k, (tiny, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else full)
    device, name = pick_device(args.tiny)
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    for alias in [m.strip() for m in args.models.split(",") if m.strip()]:
        check_model(alias, args, device, record)
    out = {"device": name, "tiny": args.tiny, "settings": {k: getattr(args, k) for k in defaults},
           "wall_s": round(time.perf_counter() - t0, 1), "results": rows}
    print(table(rows))
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
