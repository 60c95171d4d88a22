"""Turning a conversation into the prompt text a model was fine-tuned on.

The tokenizer's own chat template comes first. A named template (`conv_template=chatml`, ...) replaces it
for models that ship none or a wrong one; names we do not define are FastChat's named conversation
templates (`fastchat.conversation.get_conv_template`: vicuna_v1.1, llama-2, zephyr, openchat_3.5, ... 80+),
available with the `fastchat` extra (`pip install "merge-optimizer[fastchat]"`, i.e. fschat; formats only,
none of its API calls are used). Our four names win over FastChat's entries of the same name.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from optimizer import UserError


@dataclass(frozen=True)
class ConvTemplate:
    """A Jinja chat template (same variables as transformers' chat templates) and its end-of-turn strings."""

    jinja: str
    stop: tuple[str, ...] = ()


_LOOP = "{% for m in messages %}"
NAMED_TEMPLATES: dict[str, ConvTemplate] = {
    "chatml": ConvTemplate(
        _LOOP + "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", ("<|im_end|>",)),
    # Mistral-Instruct / Llama-2-chat style; a system message is folded into the first user turn.
    "mistral": ConvTemplate(
        "{{ bos_token }}{% set ns = namespace(sys='') %}" + _LOOP +
        "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
        "{% elif m['role'] == 'user' %}[INST] {{ ns.sys }}{{ m['content'] }} [/INST]{% set ns.sys = '' %}"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}", ("[INST]",)),
    "vicuna": ConvTemplate(
        "{% if messages[0]['role'] != 'system' %}A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "{% endif %}" + _LOOP +
        "{% if m['role'] == 'system' %}{{ m['content'] }} {% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
        "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}", ("USER:",)),
    "alpaca": ConvTemplate(
        _LOOP + "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n{% elif m['role'] == 'user' %}"
        "### Instruction:\n{{ m['content'] }}\n\n{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}", ("### Instruction:",)),
}


FASTCHAT_HINT = 'pip install "merge-optimizer[fastchat]"'


def fastchat_template_names() -> list[str] | None:
    """FastChat's registered conversation template names, or None when fschat is not installed."""
    try:
        from fastchat.conversation import conv_templates  # optional; formats only
    except ImportError:
        return None
    return sorted(conv_templates)


def check_conv_template(name: str | None, where: str) -> None:
    """UserError (before any model is loaded) unless `name` is None, ours, or one of FastChat's templates.

    Args:
        name: the configured template name.
        where: the config key shown in the message, e.g. "evaluator.conv_template".
    """
    if name is None or name in NAMED_TEMPLATES:
        return
    names = fastchat_template_names()
    if names is None:
        raise UserError(f"{where}={name!r} is unknown: not one of {sorted(NAMED_TEMPLATES)}, and FastChat's named templates "
                        f"need fschat: {FASTCHAT_HINT}.")
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        raise UserError(f"{where}={name!r} is unknown: neither one of {sorted(NAMED_TEMPLATES)} nor a FastChat template"
                        + (f" (close: {', '.join(close)})" if close else "") + f"; FastChat has {len(names)}, "
                        "listed by fastchat.conversation.conv_templates.")


def _fastchat_prompt(name: str, messages: list[dict[str, str]]) -> tuple[str, tuple[str, ...]] | None:
    try:
        from fastchat.conversation import get_conv_template  # optional; formats only
    except ImportError:
        return None
    try:
        conv = get_conv_template(name)
    except KeyError:
        return None
    for m in messages:
        if m["role"] == "system":
            conv.set_system_message(m["content"])
        else:
            conv.append_message(conv.roles[0 if m["role"] == "user" else 1], m["content"])
    conv.append_message(conv.roles[1], None)
    stop = conv.stop_str if isinstance(conv.stop_str, (list, tuple)) else [conv.stop_str]
    return conv.get_prompt(), tuple(s for s in stop if s)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], conv_template: str | None) -> tuple[str, tuple]:
    """Prompt text for the next assistant turn, and extra stop strings of the template.

    Args:
        tokenizer: a transformers tokenizer (its chat template is used unless `conv_template` is given).
        messages: [{"role": "system"|"user"|"assistant", "content": ...}, ...] ending with a user turn.
        conv_template: a name from NAMED_TEMPLATES or FastChat's registry, or None.
    """
    try:
        if conv_template is None:
            if not getattr(tokenizer, "chat_template", None):
                raise UserError("The tokenizer has no chat template, so MT-Bench answers cannot be prompted "
                                "the way the model was tuned. Set evaluator.conv_template to one of "
                                f"{sorted(NAMED_TEMPLATES)}, or to a FastChat template name such as vicuna_v1.1 "
                                f"or llama-2 ({FASTCHAT_HINT}).")
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text, ()
        if conv_template in NAMED_TEMPLATES:
            tpl = NAMED_TEMPLATES[conv_template]
            text = tokenizer.apply_chat_template(messages, chat_template=tpl.jinja, add_generation_prompt=True,
                                                 tokenize=False)
            return text, tpl.stop
    except UserError:
        raise
    except Exception as e:  # jinja raises TemplateError for e.g. a system message the template forbids
        raise UserError(f"The chat template failed on an MT-Bench conversation: {e}. Set evaluator.conv_template "
                        "or drop evaluator.system_prompt.") from None
    found = _fastchat_prompt(conv_template, messages)
    if found is None:
        check_conv_template(conv_template, "conv_template")  # says why (fschat missing, or close names)
        raise UserError(f"conv_template={conv_template!r} is unknown.")
    return found
