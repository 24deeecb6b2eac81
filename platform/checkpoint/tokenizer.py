"""A small byte-level BPE tokenizer in DeepSeek-V3's format, for tiny test checkpoints.

Trains deterministically on a fixed built-in corpus and writes `tokenizer.json` and `tokenizer_config.json` (with
DeepSeek's special tokens and a chat template) that transformers' `AutoTokenizer` loads. Byte-level, so any text
round-trips. The chat template marks assistant turns with {% generation %} so training can mask the loss.
"""
from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few experts.
DeepSeek-V3 uses multi-head latent attention with a compressed key-value cache and sigmoid gating.
Ray actors host the expert shards; a router actor runs attention and the gates and dispatches tokens.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Hello, world! How are you today? I am fine, thank you. Please answer the question in one short sentence.
The engine batches requests continuously, pages the latent cache in blocks and streams tokens back.
def forward(self, x):\n    return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))\n
for i in range(10):\n    print(i, i * i)\n
import torch\nimport ray\nfrom ray import serve\n
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14159 2.71828 -1 +1 = < > ( ) [ ] { } : ; , . ! ? ' " / \\ | @ # $ % ^ & * _ ~
The model was trained on text and code. It answers questions, writes programs and summarises documents.
Kubernetes runs the Ray cluster through KubeRay; Helm renders the RayService and the RayJob from values.
Low-rank adapters change a few matrices; the base weights stay frozen and the adapter is served by name.
Una frase en espanol. Une phrase en francais. Ein Satz auf Deutsch. Emoji and accents: cafe, naive, resume.
"""


def build_tokenizer(vocab_size: int = 1000):
    """Train the byte-level BPE (deterministic) and return a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def write_tokenizer(out_dir: str | Path, vocab_size: int = 1000, model_max_length: int = 131072) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the tokenizer's vocabulary size."""
    out = Path(out_dir)
    tok = build_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "legacy": True, "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False,
                                                           "rstrip": False, "normalized": False, "single_word": False}
                                 for t in SPECIAL_TOKENS},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return tok.get_vocab_size()
