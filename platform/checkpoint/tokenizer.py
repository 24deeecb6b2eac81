"""A small byte-level BPE tokenizer in DeepSeek-V3's format, for tiny test checkpoints.

Trains deterministically on a fixed built-in corpus and writes `tokenizer.json` and `tokenizer_config.json` (with
DeepSeek's special tokens and a chat template) that transformers' `AutoTokenizer` loads. Byte-level, so any text
round-trips. The chat template marks assistant turns with {% generation %} so training can mask the loss.

The tool-call markers, the `tool` role and the `<think>` markers are DeepSeek-V3's, as its released tokenizer_config
has them: the markers are added tokens that are NOT special (so decoded text keeps them and the server's tool-call
parser finds them), tool results render between `<｜tool▁outputs▁begin｜>` and `<｜tool▁outputs▁end｜>`, and earlier
tool calls render as `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>`. The
released V3 template leaves tool descriptions to the caller; this one renders `tools` into the system prompt the way
DeepSeek-V3.1's template does ("## Tools ... ### name / Description / Parameters").
"""
from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
THINK_BEGIN, THINK_END = "<think>", "</think>"
# added after training, not special (DeepSeek-V3 marks them "special": false): decoded text keeps them
ADDED_TOKENS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUTS_BEGIN,
                TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, THINK_BEGIN, THINK_END]

_CALL = ("'" + TOOL_CALL_BEGIN + "' + tool['type'] + '" + TOOL_SEP + "' + tool['function']['name'] + '\\n```json\\n' + "
         "tool['function']['arguments'] + '\\n```" + TOOL_CALL_END + "'")
CHAT_TEMPLATE = (
    "{% set ns = namespace(system_prompt='', is_first_sp=true, is_tool=false, is_output_first=true) %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{% else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if tools %}{% set ns.system_prompt = ns.system_prompt + ('\\n\\n' if ns.system_prompt else '') + "
    "'## Tools\\nYou have access to the following tools:\\n' %}"
    "{% for t in tools %}{% set f = t['function'] if 'function' in t else t %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n### ' + f['name'] + '\\nDescription: ' + "
    "(f['description'] or '') + '\\n\\nParameters: ' + (f['parameters'] | tojson) + '\\n' %}{% endfor %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\\n"
    + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "tool_name\\n```json\\narguments\\n```"
    + TOOL_CALL_END + TOOL_CALLS_END + "' %}{% endif %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.is_tool = false %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}{% set ns.is_tool = false %}"
    "{{ '" + ASSISTANT + "' }}{% generation %}{{ message['content'] or '' }}{{ '" + TOOL_CALLS_BEGIN + "' }}"
    "{% for tool in message['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}{{ " + _CALL + " }}"
    "{% endfor %}{{ '" + TOOL_CALLS_END + "' + eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] or '' %}"
    "{% if '" + THINK_END + "' in content %}{% set content = content.split('" + THINK_END + "')[-1] %}{% endif %}"
    "{% if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{% set ns.is_tool = false %}"
    "{% else %}{{ '" + ASSISTANT + "' }}{% endif %}"
    "{% generation %}{{ content + eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'tool' %}{% set ns.is_tool = true %}"
    "{% if ns.is_output_first %}{{ '" + TOOL_OUTPUTS_BEGIN + "' }}{% set ns.is_output_first = false %}"
    "{% else %}{{ '\\n' }}{% endif %}"
    "{{ '" + TOOL_OUTPUT_BEGIN + "' + message['content'] + '" + TOOL_OUTPUT_END + "' }}"
    "{% endif %}{% endfor %}"
    "{% if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '" + ASSISTANT + "' }}{% endif %}"
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
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # the added tokens come after training, inside the same vocab_size (ids below vocab_size - len(ADDED_TOKENS)
    # are what a plain training would give)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(ADDED_TOKENS), special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
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
                                 for t in SPECIAL_TOKENS} | {
            str(tok.token_to_id(t)): {"content": t, "special": False, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False} for t in ADDED_TOKENS},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return tok.get_vocab_size()
