"""Tiny random-initialised models of real architectures, built from configs (no download).

Tests and smoke runs use them so that the suite needs no weights; they borrow the embedded MiniLM
tokenizer's vocabulary (WordPiece, 30,522 tokens) so their inputs are real tokenised text.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("bert", "gpt2", "llama", "llama_tied", "t5")


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, **size: int) -> Path:
    """Save a randomly initialised `arch` model (2 or 3 blocks of width 32) with the embedded MiniLM
    tokenizer to `out_dir`: the tests' stand-in for each architecture family. `llama_tied` ties the
    output head to the input embeddings, as SmolLM2 (and most small causal LMs) do; the Llamas take
    `hidden` and `layers` (`size`) for tests that need a model above a process's RSS noise."""
    import torch

    from leantune.models.loader import load_tokenizer

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture '{arch}'; choose from {ARCHS}")
    tok = load_tokenizer("embedded:minilm")
    torch.manual_seed(seed)
    model = _TINY[arch](tok, **size)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _special_ids(tok) -> dict[str, int]:
    """The decoders' pad/bos/eos, taken from the BERT-style tokenizer every tiny model shares."""
    return {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,
    }


def _tiny_bert(tok):
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    return transformers.BertForSequenceClassification(cfg)


def _tiny_gpt2(tok):
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=3, n_head=2, n_positions=128, **_special_ids(tok)
    )
    return transformers.GPT2LMHeadModel(cfg)


def _tiny_llama(tok, tied: bool = False, hidden: int = 32, layers: int = 3):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention, as in the real Llama family
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        **_special_ids(tok),
    )
    return transformers.LlamaForCausalLM(cfg)


def _tiny_t5(tok):
    import transformers

    cfg = transformers.T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    return transformers.T5ForConditionalGeneration(cfg)


_TINY = {
    "bert": _tiny_bert,
    "gpt2": _tiny_gpt2,
    "llama": _tiny_llama,
    "llama_tied": lambda tok, **size: _tiny_llama(tok, tied=True, **size),
    "t5": _tiny_t5,
}


if __name__ == "__main__":  # python -m leantune.models.tiny bert runs/tiny-bert  (e.g. for the smoke bench)
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in ARCHS:
        raise SystemExit(f"usage: python -m leantune.models.tiny {{{','.join(ARCHS)}}} OUT_DIR")
    print(build_tiny_model(sys.argv[1], sys.argv[2]))
