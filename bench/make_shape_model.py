"""Write a random-weight HF model directory of a named shape (bench/decode.py's SHAPES), with
a word-level tokenizer that covers its whole vocabulary, so `kiln compile`/`kiln serve` and
the serving benchmark can run real model shapes on a machine with no downloads.

    python bench/make_shape_model.py llama-3.2-1b -o /tmp/llama-3.2-1b --dtype bfloat16

Token i decodes to " t<i>": random weights give random ids, and every one of them must
detokenize (a borrowed tokenizer with a smaller vocabulary would not).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES  # noqa: E402


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to initialise the weights (faster on a GPU)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPES[args.shape], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    word_tokenizer(config.vocab_size).save_pretrained(args.out)
    print(f"wrote {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
