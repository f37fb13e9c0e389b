"""Rendering a generation with each verify step visible (``draftopd generate --show-acceptance``).

Per verify step: the accepted draft tokens, then the target's token (a *correction* when a draft token was
rejected, a *bonus* when all were accepted), then the rejected proposals struck out. On a terminal this is
coloured; otherwise plain markers are used: ``accepted{correction}~~rejected~~`` and ``accepted(bonus)``.
"""

from __future__ import annotations

import sys

from draftopd.decoding.loop import VerifyStep

GREEN, YELLOW, CYAN, STRIKE, RESET = "\033[32m", "\033[33m", "\033[36m", "\033[9;2m", "\033[0m"


def render_steps(tokenizer, tokens: list[int], steps: list[VerifyStep], color: bool | None = None) -> str:
    color = sys.stdout.isatty() if color is None else color
    dec = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    parts = [dec(tokens[:1])]  # the first token comes from the prefill, not from a verify step
    for s in steps:
        acc, tok, rej = dec(s.draft[: s.n_accepted]), dec([s.token]), dec(s.draft[s.n_accepted + 1 :])
        wrong = dec(s.draft[s.n_accepted : s.n_accepted + 1])
        correction = s.n_accepted < len(s.draft)
        if color:
            parts.append(f"{GREEN}{acc}{RESET}{YELLOW if correction else CYAN}{tok}{RESET}")
            if correction:
                parts.append(f"{STRIKE}{wrong}{rej}{RESET}")
        else:
            parts.append(acc + (f"{{{tok}}}~~{wrong}{rej}~~" if correction else f"({tok})"))
    legend = (
        f"{GREEN}accepted draft{RESET} {YELLOW}correction{RESET} {CYAN}bonus{RESET} {STRIKE}rejected{RESET}"
        if color
        else "legend: accepted{correction}~~rejected drafts~~ accepted(bonus)"
    )
    n = len(steps)
    acc_total = sum(s.n_accepted for s in steps)
    return f"{''.join(parts)}\n\n{legend}\n{n} verify steps, {acc_total} draft tokens accepted"
