"""``codedistill btp``: the typer command function (registered by codedistill.cli) and a
standalone one-command app for ``experiments/step2_btp_finetune_experiment.py``.

Every flag defaults to "not given" (None) so that ``--config F`` (YAML) values apply
unless a flag overrides them; unset everywhere, BTPConfig's defaults apply.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from codedistill.ui import friendly_errors

O = typer.Option  # noqa: E741
SERVING_FLAGS = ("base_url", "api_key_env", "served_model_name", "concurrency", "max_n", "vllm_python",
                 "tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization", "max_model_len",
                 "price_input", "price_output", "response_cache")


@friendly_errors
def btp_command(
    config: Optional[Path] = O(None, "--config", help="YAML file of settings (flags override it)."),
    source_model: Optional[str] = O(None, "--source-model", help="Alias (StarCoder2-15B, tiny-source, ...), hub id or dir."),
    target_model: Optional[str] = O(None, "--target-model", help="Alias, hub id or dir of the model to fine-tune."),
    source_variant: Optional[str] = O(None, "--source-variant", help="base | instruct"),
    target_variant: Optional[str] = O(None, "--target-variant", help="base | instruct"),
    mode: Optional[str] = O(None, "--mode", help="finetune (source teaches) | self (target teaches itself) | mixed"),
    dataset: Optional[str] = O(None, "--dataset", help="Training set: mbpp | mbpp-sanitized | synth (train split)."),
    data_path: Optional[str] = O(None, "--data-path", help="Local dataset file/folder."),
    max_problems: Optional[int] = O(None, "--max-problems", help="First N training problems."),
    eval_max_problems: Optional[int] = O(None, "--eval-max-problems", help="First N held-out problems."),
    eval_datasets: Optional[str] = O(None, "--eval-datasets", help="Extra held-out sets, e.g. humaneval (comma-separated)."),
    allow_overlap: Optional[bool] = O(None, "--allow-overlap/--no-allow-overlap", help="Allow train/eval overlap (reported in bold)."),
    drop_overlap: Optional[bool] = O(None, "--drop-overlap/--no-drop-overlap", help="Leave training problems that are also eval problems out."),
    generation: Optional[str] = O(None, "--generation", help="beam | sample | egcfg (EG-CFG's agents write the programs; HF backend)"),
    num_beams: Optional[int] = O(None, "--num-beams", help="Beams per problem (all returned)."),
    num_samples: Optional[int] = O(None, "--num-samples", help="Samples per problem with --generation sample."),
    gen_temperature: Optional[float] = O(None, "--gen-temperature", help="Temperature of --generation sample."),
    max_new_tokens: Optional[int] = O(None, "--max-new-tokens"),
    length_penalty: Optional[float] = O(None, "--length-penalty", help="Beam search length penalty."),
    p2_alpha: Optional[float] = O(None, "--p2-alpha", help="a in P2Value = a*P + (1-a)*pass_rate (default 0.2)."),
    sampling_method: Optional[str] = O(None, "--sampling-method", help="power | rank | greedy | uniform"),
    sampling_alpha: Optional[float] = O(None, "--sampling-alpha", help="Priority exponent (0-20)."),
    is_weights: Optional[bool] = O(None, "--is-weights/--no-is-weights", help="Importance-sampling weights on the loss."),
    is_beta: Optional[float] = O(None, "--is-beta", help="IS exponent beta in [0, 1]."),
    replay_size: Optional[int] = O(None, "--replay-size", help="Draws per iteration (default: buffer size)."),
    n_iterations: Optional[int] = O(None, "--n-iterations", help="BTP iterations."),
    use_lora: Optional[bool] = O(None, "--use-lora/--full-finetune", help="LoRA adapters (peft) or full fine-tuning."),
    lora_r: Optional[int] = O(None, "--lora-r"),
    lora_alpha: Optional[int] = O(None, "--lora-alpha"),
    lora_dropout: Optional[float] = O(None, "--lora-dropout"),
    lora_target_modules: Optional[str] = O(None, "--lora-target-modules", help="Comma-separated (default: registry's per-family list)."),
    learning_rate: Optional[float] = O(None, "--learning-rate", "--lr"),
    epochs: Optional[int] = O(None, "--epochs"),
    train_batch_size: Optional[int] = O(None, "--train-batch-size"),
    grad_accum: Optional[int] = O(None, "--grad-accum"),
    max_length: Optional[int] = O(None, "--max-length", help="Max tokens of prompt + program in training."),
    merge: Optional[bool] = O(None, "--merge/--no-merge", help="Also write iter_K/merged/ (LoRA folded in)."),
    num_processes: Optional[int] = O(None, "--num-processes", help="Training processes: each fine-tuning phase runs under `accelerate launch` (generation stays single-process)."),
    accelerate_config: Optional[str] = O(None, "--accelerate-config", help="ddp | fsdp | zero2 | zero3 (configs/accelerate/) or an accelerate YAML."),
    gradient_checkpointing: Optional[bool] = O(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward (less memory)."),
    mixed_precision: Optional[str] = O(None, "--mixed-precision", help="no | bf16 | fp16 (autocast over fp32 master weights)."),
    load_in_4bit: Optional[bool] = O(None, "--load-in-4bit/--no-load-in-4bit", help="QLoRA: the base in 4-bit NF4 (bitsandbytes, CUDA GPUs only)."),
    report_to: Optional[str] = O(None, "--report-to", help="tensorboard | wandb | mlflow (comma-separated; wandb offline)."),
    eval_num_samples: Optional[int] = O(None, "--eval-num-samples", help="Samples per held-out problem (pass@k)."),
    eval_temperature: Optional[float] = O(None, "--eval-temperature"),
    eval_source: Optional[bool] = O(None, "--eval-source/--no-eval-source", help="Also evaluate the source."),
    seed: Optional[int] = O(None, "--seed"),
    timeout: Optional[float] = O(None, "--timeout", help="Seconds per program in the sandbox."),
    workers: Optional[int] = O(None, "--workers", help="Parallel sandboxes."),
    device: Optional[str] = O(None, "--device", help="cpu | cuda (default: cuda if available)."),
    dtype: Optional[str] = O(None, "--dtype", help="auto | bf16 | fp16 | fp32"),
    gen_batch_size: Optional[int] = O(None, "--gen-batch-size", help="Sequences per generate call."),
    chunk_size: Optional[int] = O(None, "--chunk-size", help="Problems per checkpointed chunk."),
    output_dir: Optional[str] = O(None, "--output-dir", help="Run directory (restart the same command to resume)."),
    backend: Optional[str] = O(None, "--backend", help="hf | vllm | openai for both roles (default: registry's)."),
    source_backend: Optional[str] = O(None, "--source-backend", help="hf | vllm | openai for the source."),
    target_backend: Optional[str] = O(None, "--target-backend", help="hf | vllm for the target's generation (vllm serves its LoRA adapter)."),
    base_url: Optional[list[str]] = O(None, "--base-url", help="OpenAI-compatible endpoint(s) of the served model; repeat for replicas."),
    api_key_env: Optional[str] = O(None, "--api-key-env", help="Environment variable with the API key (DeepSeek: DEEPSEEK_API_KEY)."),
    served_model_name: Optional[str] = O(None, "--served-model-name", help="Name the endpoint knows the source by (DeepSeek: deepseek-chat)."),
    concurrency: Optional[int] = O(None, "--concurrency", help="Requests in flight (served backends)."),
    max_n: Optional[int] = O(None, "--max-n", help="Largest n per request the endpoint takes."),
    vllm_python: Optional[str] = O(None, "--vllm-python", help="Interpreter of the vLLM environment (default .venv-vllm)."),
    tensor_parallel_size: Optional[int] = O(None, "--tensor-parallel-size", help="vLLM: GPUs per replica."),
    data_parallel_size: Optional[int] = O(None, "--data-parallel-size", help="vLLM: replicas."),
    gpu_memory_utilization: Optional[float] = O(None, "--gpu-memory-utilization", help="vLLM: share of GPU memory."),
    max_model_len: Optional[int] = O(None, "--max-model-len", help="vLLM: context length."),
    price_input: Optional[float] = O(None, "--price-input", help="USD per 1M prompt tokens (cost in the report)."),
    price_output: Optional[float] = O(None, "--price-output", help="USD per 1M completion tokens."),
    response_cache: Optional[str] = O(None, "--response-cache", help="Response cache file shared by runs (default: one in the run directory)."),
) -> None:
    """Step 2, BTP: source beams -> tests -> P2Value-prioritized replay -> fine-tune the target."""
    flags = dict(locals())
    from codedistill.btp.config import build_config, load_config_file

    cfg_path = flags.pop("config")
    if flags.get("lora_target_modules"):
        flags["lora_target_modules"] = [m.strip() for m in flags["lora_target_modules"].split(",") if m.strip()]
    yaml_values = load_config_file(cfg_path) if cfg_path else {}
    serving_flags = {k: flags.pop(k) for k in SERVING_FLAGS}
    serving_flags["price_input_per_1m"] = serving_flags.pop("price_input")
    serving_flags["price_output_per_1m"] = serving_flags.pop("price_output")
    serving_flags["cache_path"] = serving_flags.pop("response_cache")
    serving_flags = {k: v for k, v in serving_flags.items() if v is not None}
    if serving_flags:  # flags override the YAML's serving settings one by one
        flags["serving"] = {**dict(yaml_values.get("serving") or {}), **serving_flags}
    cfg = build_config(yaml_values, flags)
    from codedistill.btp.loop import run_btp

    comparison = run_btp(cfg, log=lambda m: typer.echo(m, err=True))
    for ds, e in comparison["datasets"].items():
        b, a = e["target_before"].get("pass@1"), e["target_after"].get("pass@1")
        if b and a:
            typer.echo(f"{ds}: target pass@1 {b['value']:.3f} -> {a['value']:.3f} "
                       f"({e['improvement']['pass@1']['diff']:+.3f})")


btp_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
btp_app.command(name="btp")(btp_command)


def main(argv: list[str] | None = None) -> None:
    btp_app(list(sys.argv[1:] if argv is None else argv), prog_name="step2_btp_finetune_experiment.py")
