"""Entry point of the `ft` general plugin (`sglang.srt.plugins`): registers the hooks listed in hooks.py.

SGLang calls `load()` in every process (launcher, tokenizer manager, each scheduler) before applying hooks.
"""

from __future__ import annotations


def load() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_ft.hooks import HOOKS

    for target, hook_type, handler in HOOKS:
        HookRegistry.register(target, handler, hook_type)
