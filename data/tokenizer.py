"""A small tokenizer for the causal-loop task, built with the ``tokenizers`` library.

No pretrained tokenizer can be downloaded here, and a tiny model trained from scratch learns faster on
a small vocabulary. Pieces are the template's words (with their leading space), single digits (so
numbers are composed, as in most LLM tokenizers), the four tags, newlines and punctuation. Decoding
concatenates pieces, so ``decode(encode(text)) == text`` for any text the task produces.

    tokenizer = build_tokenizer()                 # a transformers PreTrainedTokenizerFast
    tokenizer.save_pretrained(path); load_tokenizer(path)   # AutoTokenizer too, except beside a Qwen2 config
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.causal_loop import TaskConfig, generate, render

PIECE = r"</?(?:think|answer)>| ?[A-Za-z]+| ?[0-9]|\n| |[^\sA-Za-z0-9]"
SPECIAL = ["<pad>", "<eos>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _corpus_pieces() -> set[str]:
    """Every piece the task's texts use: all levels, both semantics, both question styles, base and chat
    templates."""
    batch = generate(TaskConfig(num_vars=(3, 8), num_steps=(1, 8)), 2000, seed=0)
    texts = render.questions(batch).to_pylist() + render.solutions(batch).to_pylist()
    texts += render.compact_questions(batch).to_pylist()
    texts += render.base_prompts(render.questions(batch.take(slice(0, 10)))).to_pylist()
    texts += ["user: ", "assistant:", "system: "]
    pieces = {p for text in texts for p in re.findall(PIECE, text)}
    pieces |= set(string.ascii_letters) | {" " + c for c in string.ascii_letters}  # any variable name
    pieces |= set(string.digits) | {" " + d for d in string.digits} | set(string.punctuation) | {" ", "\n"}
    return pieces


GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")  # what build_tokenizer saves as


def load_tokenizer(path: str | Path):
    """A saved tokenizer as it was saved. ``AutoTokenizer`` swaps the saved class for the model type's own for
    some types, qwen2 among them (transformers' ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``): this project's
    vocabulary next to a Qwen2 config would then be re-tokenised with Qwen2's byte-level rules, other ids for
    the same text. A tokenizer saved as the generic backend (``build_tokenizer``'s) is loaded as one."""
    config = Path(path) / "tokenizer_config.json"
    saved = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if saved in GENERIC_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(_corpus_pieces()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
