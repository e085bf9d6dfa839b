#!/usr/bin/env python3
"""Train the bundled demo model: a ~6M-parameter Llama on the King James Bible.

The corpus comes from scripts/make_demo_corpus.sh (Debian package bible-kjv). The script
trains a byte-level BPE tokenizer, builds a deterministic 50/50 mix of plain verse runs and
chat examples, trains a small LlamaForCausalLM, and saves a Hugging Face model directory
(bfloat16 safetensors, tokenizer with chat template, generation config, model card).

Example:
    python scripts/train_demo_model.py --corpus data/kjv.txt --out models/demo --steps 10800 --device cuda --seed 0

The bundled models/demo was made by that command on one H100 in about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

log = logging.getLogger("train_demo_model")

VOCAB_SIZE = 4096
BOS = PAD = "<|endoftext|>"
EOS = "<|end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Each message is "<|role|>\n{content}<|end|>\n"; the generation prompt is "<|assistant|>\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Short, generic system prompts so that a system message does not derail the model.
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You are a friendly chatbot.",
    "Answer the user's question.",
    "You are an AI assistant.",
]

CHAT_FRACTION = 0.5  # share of training documents that are chat examples
SYSTEM_FRACTION = 0.3  # share of chat examples that start with a system message


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float  # mean loss over 8 fixed training batches, after training
    seconds: float
    device: str
    tokens_seen: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path("data/kjv.txt"), help="one verse per line")
    p.add_argument("--out", type=Path, default=Path("models/demo"), help="output model directory")
    p.add_argument("--steps", type=int, default=10800, help="optimizer steps")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay to 10%%)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: min(200, steps/10))")
    p.add_argument("--num-docs", type=int, default=60_000, help="training documents to generate")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def read_verses(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path} not found; run scripts/make_demo_corpus.sh first")
    verses = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    verses = [v for v in verses if v]
    if len(verses) < 1000:
        raise ValueError(f"corpus {path} has only {len(verses)} verses; expected about 31102")
    return verses


def train_tokenizer(verses: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) so any text round-trips, spaces included."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Verses joined by newlines, as the model sees them, so "\n" merges are learned too.
    chunks = ["\n".join(verses[i : i + 50]) for i in range(0, len(verses), 50)]
    tok.train_from_iterator(chunks, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[1:4],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def make_documents(verses: list[str], num_docs: int, seed: int) -> list[str]:
    """Deterministic (from seed) mix of plain verse runs and chat examples."""
    rng = random.Random(seed)
    n = len(verses)
    docs: list[str] = []
    for _ in range(num_docs):
        if rng.random() < CHAT_FRACTION:
            i = rng.randrange(n - 2)
            answer = verses[i + 1] if rng.random() < 0.5 else verses[i + 1] + " " + verses[i + 2]
            system = ""
            if rng.random() < SYSTEM_FRACTION:
                system = f"<|system|>\n{rng.choice(SYSTEM_PROMPTS)}<|end|>\n"
            docs.append(f"{system}<|user|>\n{verses[i]}<|end|>\n<|assistant|>\n{answer}<|end|>\n")
        else:
            length = rng.randint(2, 8)
            i = rng.randrange(n - length)
            docs.append("\n".join(verses[i : i + length]))
    return docs


def pack_documents(tok: PreTrainedTokenizerFast, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents, each followed by <|endoftext|>; return (stream, doc_starts)."""
    eot = tok.convert_tokens_to_ids(BOS)
    encoded = tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    starts: list[int] = []
    for enc in encoded:
        starts.append(len(ids))
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    starts: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> TrainResult:
    """Train on windows of seq_len tokens that each begin at a document start."""
    model.to(device)
    model.train()
    stream = stream.to(device)
    # Only starts with a full window after them; windows may run on into later documents.
    starts = starts[starts + args.seq_len <= stream.numel()].to(device)
    offsets = torch.arange(args.seq_len, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=args.lr,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=device.type == "cuda",
    )
    warmup = args.warmup if args.warmup is not None else max(1, min(200, args.steps // 10))
    use_bf16 = device.type == "cuda"
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        pick = torch.randint(0, starts.numel(), (args.batch_size,), device=device, generator=gen)
        batch = stream[starts[pick, None] + offsets]  # [batch, seq]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:  # .item() syncs: not every step
            log.info("step %5d/%d  loss %.4f  lr %.2e  %.1fs", step, args.steps, loss.item(),
                     opt.param_groups[0]["lr"], time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    final_loss = evaluate_tail_loss(model, stream, starts, offsets, args, use_bf16, device)
    return TrainResult(
        steps=args.steps,
        final_loss=final_loss,
        seconds=seconds,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        tokens_seen=args.steps * args.batch_size * args.seq_len,
    )


@torch.no_grad()
def evaluate_tail_loss(model, stream, starts, offsets, args, use_bf16, device) -> float:
    """Loss of the trained model on 8 fixed batches of training windows (seed-determined)."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    total = 0.0
    n_batches = 8
    for _ in range(n_batches):
        pick = torch.randint(0, starts.numel(), (args.batch_size,), device=device, generator=gen)
        batch = stream[starts[pick, None] + offsets]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            total += model(input_ids=batch, labels=batch).loss.item()
    return total / n_batches


@torch.no_grad()
def samples(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> dict[str, str]:
    """Greedy continuation of a plain prompt and a greedy chat reply."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, str] = {}
    prompt = "In the beginning"
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=60)
    out[prompt] = tok.decode(gen[0], skip_special_tokens=False)
    question = "Who created the heaven and the earth?"
    chat_ids = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"].to(device)
    gen = model.generate(chat_ids, attention_mask=torch.ones_like(chat_ids), do_sample=False,
                         max_new_tokens=80)
    out[question] = tok.decode(gen[0, chat_ids.shape[1] :], skip_special_tokens=False)
    return out


def write_model_card(out: Path, command: str, result: TrainResult, n_params: int,
                     n_verses: int, sample_text: dict[str, str], args: argparse.Namespace) -> None:
    (plain, plain_out), (question, reply) = sample_text.items()
    sample_md = (
        f"Plain text, prompt `{json.dumps(plain)}`, 60 new tokens →\n\n```text\n{plain_out}\n```\n\n"
        f"Chat (`apply_chat_template`, one user message `{json.dumps(question)}`), reply →\n\n"
        f"```text\n{reply}\n```\n"
    )
    card = f"""---
license: other
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [demo, tiny, llama, kjv]
---

# demo: a tiny KJV-trained chat model

A {n_params / 1e6:.1f}M-parameter `LlamaForCausalLM` (hidden 256, 6 layers, 8 heads, 4 KV heads,
MLP 768, vocab {len_vocab(out)}, context 512, tied embeddings) trained from scratch on the King James
Bible. It exists so that tests and demos of this project can run offline on a real, small
chat model: it writes recognizable KJV words and phrases and answers in the chat format below.
It knows nothing else and is not useful as an assistant.

Weights are stored in bfloat16 (`model.safetensors`); they load in float32 as well.

## Chat format

```text
<|system|>
You are a helpful assistant.<|end|>
<|user|>
And God said, Let there be light: and there was light.<|end|>
<|assistant|>
```

Each message is `<|{{role}}|>\\n{{content}}<|end|>\\n`; the generation prompt is `<|assistant|>\\n`
(`tokenizer.apply_chat_template(..., add_generation_prompt=True)`). Generation stops at
`<|end|>` or `<|endoftext|>` (both are `eos_token_id` in `generation_config.json`).
Special tokens: `<|endoftext|>` (bos, pad, document separator), `<|system|>`, `<|user|>`,
`<|assistant|>`, `<|end|>` (eos). Byte-level BPE tokenizer, vocab {VOCAB_SIZE}, trained on the same text.

## Data

- Source: the Debian package `bible-kjv` (program `bible`, data `bible-kjv-text`), dumped by
  `scripts/make_demo_corpus.sh` to `data/kjv.txt`: all {n_verses} verses, Genesis 1:1 to
  Revelation 22:21, one verse per line, references stripped.
- The King James Version text is in the public domain in most of the world. In the United
  Kingdom it remains under perpetual Crown copyright (administered by the King's Printer /
  Cambridge University Press under Letters Patent).
- The `bible-kjv` package's code (the Bible Retrieval System, Chip Chapin; Debian work by Matthew
  Vernon and others) is licensed GPL-2+. No code of that package is included here, only a
  model trained on the text it prints.
- Training mix (deterministic from the seed): {args.num_docs} documents, about half plain runs of 2–8
  consecutive verses joined by newlines, half chat examples `<|user|>` verse i → `<|assistant|>` verse
  i+1 (sometimes i+1 and i+2), 30% of them with a short generic system message. Documents are
  separated by `<|endoftext|>`; each training window of {args.seq_len} tokens starts at a document start.
  Loss on all tokens.

## Training

```bash
scripts/make_demo_corpus.sh
{command}
```

- steps: {result.steps}, batch {args.batch_size} × {args.seq_len} tokens ({result.tokens_seen / 1e6:.0f}M tokens seen)
- optimizer: AdamW (betas 0.9/0.95, weight decay 0.1), peak LR {args.lr:g}, linear warmup then cosine
  decay to 10%, grad clip 1.0; bf16 autocast on CUDA
- seed: {args.seed}
- device: {result.device}; training time {result.seconds:.0f} s
- final loss (mean over 8 fixed training batches after training): {result.final_loss:.3f}

There is no held-out set: the loss is on training windows, and at this loss the model has
largely memorized the text. That is intended; its job is to emit recognizable KJV phrases.

GPU runs are not bit-reproducible; the corpus, tokenizer and data mix are.

## Samples (greedy)

{sample_md}
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def len_vocab(out: Path) -> int:
    return json.loads((out / "config.json").read_text())["vocab_size"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    verses = read_verses(args.corpus)
    log.info("corpus: %d verses from %s", len(verses), args.corpus)
    tok = train_tokenizer(verses)
    probe = "In the beginning God created the heaven and the earth.\n  Amen,  amen!"
    assert tok.decode(tok(probe).input_ids) == probe, "tokenizer does not round-trip"
    log.info("tokenizer: %d tokens", len(tok))

    docs = make_documents(verses, args.num_docs, args.seed)
    stream, starts = pack_documents(tok, docs)
    log.info("data: %d documents, %d tokens", len(docs), stream.numel())

    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, device %s", n_params / 1e6, device)

    result = train(model, stream, starts, args, device)
    log.info("trained %d steps in %.0fs; final loss %.4f", result.steps, result.seconds, result.final_loss)

    sample_text = samples(model, tok)
    eos_ids = [tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(BOS)]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=128,
    )
    model.config.eos_token_id = eos_ids[0]
    model.to("cpu", dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)

    command = "python scripts/train_demo_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_model_card(args.out, command, result, n_params, len(verses), sample_text, args)

    print(f"\nsaved to {args.out}")
    for prompt, text in sample_text.items():
        print(f"\n=== {prompt!r} (greedy)\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
