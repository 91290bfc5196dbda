"""One TRL BCOTrainer configuration (trl 1.13.0, trl.experimental.bco), in this process: prints one JSON line
(see common.report). Run with bench/.venv-trl (bench/setup_trl.sh); bench.py calls it.

  bench/.venv-trl/bin/python bench/run_trl.py --model ~/.cache/qbco/smollm2-135m-instruct \
      --data bench/out/w1.jsonl --rows 0:40 --steps 5 [--precompute]

Same work as run_qbco.py: the same rows in the same batches (qbco's first-epoch order; BCOTrainer reads its
dataset sequentially), the same NF4 base, LoRA, beta, learning rate and schedule, fp32 compute. The reference
is the adapter-disabled base, as in qbco, because the LoRA goes in as peft_config.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # bench/ is not a package: found through the path above; its clock starts here

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def disable_cpu_repack(model) -> int:
    """The guard qbco applies (docs/pitfalls.md, 13): without it, TRL's precompute pass runs the 4-bit layers in eval
    mode without grad on a CPU with avx512bf16, bitsandbytes repacks their weights for an inference kernel
    that has no backward, and every later LoRA gradient through them is silently wrong. With it both tools
    train correctly and the comparison is of correct training."""
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )
    from trl.experimental.bco import BCOConfig, BCOTrainer

    import_s = time.perf_counter() - common.T_START
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    kwargs = {"dtype": dtype, "use_safetensors": True}
    if not args.no_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
        )
    kwargs["device_map"] = {"": "cuda:0" if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    disable_cpu_repack(model)

    def prompt_text(prompt: str) -> str:  # what qbco.data.feedback.prompt_text makes of a string prompt
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        return prompt + "\n\n"

    rows = common.read_rows(args.data, args.rows)
    ordered = [rows[i] for i in common.training_order(len(rows), args.batch, args.seed)]
    dataset = Dataset.from_list([{"prompt": prompt_text(r["prompt"]), "completion": r["completion"],
                                  "label": bool(r["label"])} for r in ordered])

    step_seconds: list[float] = []
    step_tokens: list[int] = []
    step_cpu: list[float] = []  # CPU seconds of all threads: less disturbed by other processes than wall time
    losses: list[float] = []
    marks = {"ref_s": 0.0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks["step_start"] = time.perf_counter()
            marks["cpu_start"] = time.process_time()
            step_tokens.append(0)
            losses.append(0.0)

        def on_step_end(self, a, state, control, **kw):
            step_seconds.append(time.perf_counter() - marks["step_start"])
            step_cpu.append(time.process_time() - marks["cpu_start"])

    class MeasuredBCOTrainer(BCOTrainer):
        def get_train_dataloader(self):  # the reference precompute happens in its first call
            t = time.perf_counter()
            loader = super().get_train_dataloader()
            marks["ref_s"] += time.perf_counter() - t
            return loader

        def training_step(self, model, inputs, *rest, **kw):
            # Non-padding prompt + completion tokens: the same count qbco's metrics.jsonl records.
            step_tokens[-1] += int(inputs["completion_attention_mask"].sum())
            loss = super().training_step(model, inputs, *rest, **kw)
            losses[-1] += float(loss)
            return loss

    work = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    config = BCOConfig(
        output_dir=str(work), beta=0.1, learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing != "off", max_steps=args.steps,
        # BCOTrainer keeps max_length less one for a BOS and one for an EOS the tokenizer does not add itself
        # (_process_tokens): two more, so that a row qbco keeps whole is whole here too.
        max_length=args.max_prompt + args.max_completion + 2, max_completion_length=args.max_completion,
        precompute_ref_log_probs=args.precompute, bf16=args.dtype == "bf16", fp16=False, use_cpu=not cuda, seed=args.seed,
        report_to=[], eval_strategy="no", save_strategy="no", logging_steps=1, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                             task_type="CAUSAL_LM")
    trainer = MeasuredBCOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[StepTimer()])
    load_peak = common.reset_peak_rss()
    start_rss = common.current_rss_mb()
    trainer.train()
    whole_s = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    common.report(args, "trl-precompute" if args.precompute else "trl-default", step_seconds, step_tokens, losses,
                  load_peak, start_rss, marks["ref_s"], whole_s, import_s, step_cpu=step_cpu,
                  extra={"checkpointing": "every layer checkpointed" if config.gradient_checkpointing else "no layer checkpointed"})


if __name__ == "__main__":
    main()
