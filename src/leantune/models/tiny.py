"""Tiny random-initialised models of real architectures, built from configs (no download).

Tests and smoke runs use them so that the suite needs no weights; they borrow the embedded MiniLM
tokenizer's vocabulary (WordPiece, 30,522 tokens) so their inputs are real tokenised text.
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("bert", "gpt2", "llama", "t5")


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    import torch
    import transformers

    from leantune.models.loader import load_tokenizer

    tok = load_tokenizer("embedded:minilm")
    vocab = len(tok)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.cls_token_id,
        "eos_token_id": tok.sep_token_id,
    }
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tok.pad_token_id,
        )
        model = transformers.BertForSequenceClassification(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=3, n_head=2, n_positions=128, **ids
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=128,
            **ids,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "t5":
        cfg = transformers.T5Config(
            vocab_size=vocab,
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
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown tiny architecture '{arch}'; choose from {ARCHS}")
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":  # python -m leantune.models.tiny bert runs/tiny-bert  (e.g. for the smoke bench)
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in ARCHS:
        raise SystemExit(f"usage: python -m leantune.models.tiny {{{','.join(ARCHS)}}} OUT_DIR")
    print(build_tiny_model(sys.argv[1], sys.argv[2]))
