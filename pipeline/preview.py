"""The plan picture: one bar of the model's blocks coloured by tier, with bytes per tier.

Plain HTML with inline styles, so it renders the same in the app, a notebook or a saved file.
Every piece of text that comes from outside (model names, error messages) is escaped.
"""

from __future__ import annotations

import html
import re
from html import escape

from .planning import Plan, device_label, format_bytes

COLOURS = {"GPU": "#16a34a", "CPU": "#2563eb", "disk": "#d97706"}


def _tier(device: int | str) -> str:
    return "GPU" if isinstance(device, int) else device_label(device)


def _colour(device: int | str) -> str:
    if isinstance(device, int):  # shades of green per GPU
        return ["#16a34a", "#15803d", "#4ade80", "#166534"][device % 4]
    return COLOURS[_tier(device)]


def plan_html(plan: Plan, budgets_text: str = "", speed_text: str = "", what_if: str = "") -> str:
    """The bar, a legend with bytes per device, the one-line summary and the predicted speed."""
    total = plan.total_bytes or 1
    segments = []
    for block in plan.blocks:
        share = block.bytes / total * 100
        title = f"{block.name} · {device_label(block.device)} · {format_bytes(block.bytes)}"
        segments.append(
            f'<div class="plan-seg" data-device="{escape(str(block.device))}" title="{escape(title)}" '
            f'style="flex:{max(share, 0.4):.3f} 1 0;background:{_colour(block.device)};'
            f'border-right:1px solid rgba(255,255,255,.6)"></div>'
        )
    legend = []
    for device, size in plan.bytes_per_device.items():
        layers = plan.layers_per_device.get(device, ())
        legend.append(
            f'<span class="plan-legend" data-device="{escape(str(device))}" style="margin-right:1.2em">'
            f'<span style="display:inline-block;width:.8em;height:.8em;border-radius:2px;'
            f'background:{_colour(device)};margin-right:.35em;vertical-align:middle"></span>'
            f"<b>{escape(device_label(device))}</b> {format_bytes(size)} · {size / total * 100:.0f} %"
            f" · {len(layers)} layer{'s' if len(layers) != 1 else ''}</span>"
        )
    notes = "".join(f'<div style="opacity:.75;font-size:.85em">{escape(n)}</div>' for n in plan.notes)
    if plan.draft is not None:  # beside the bar, which is the target's: its bytes came out of the same budget
        draft = plan.draft
        notes = (f'<div class="plan-draft" data-device="{escape(str(draft.device))}" style="font-size:.85em">'
                 f'<span style="display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;'
                 f'vertical-align:middle;background:repeating-linear-gradient(45deg,{_colour(draft.device)} 0 3px,'
                 f'#fff 3px 5px)"></span><b>Draft model</b> {escape(draft.model)} on '
                 f'{escape(device_label(draft.device))}: {format_bytes(draft.weight_bytes)} weights + '
                 f'{format_bytes(draft.cache_bytes)} KV cache ({draft.context_length} tokens), out of its budget</div>'
                 ) + notes
    budgets = f'<div style="opacity:.75;font-size:.85em">Budgets: {escape(budgets_text)}</div>' if budgets_text else ""
    if speed_text:
        budgets = (f'<div class="plan-speed" style="font-size:.9em;margin-top:.2em">Predicted: {escape(speed_text)}'
                   "</div>") + budgets
    if what_if:
        budgets = (f'<div class="plan-what-if" style="font-size:.9em;color:#92400e">Planned for {escape(what_if)}: '
                   "loading needs the real hardware</div>") + budgets
    return (
        '<div class="plan-preview" data-fits="true">'
        f'<div style="font-weight:600;margin-bottom:.3em">{escape(plan.model)} · '
        f"{escape(str(plan.dtype).removeprefix('torch.'))} · quantization {escape(plan.quantization)} · "
        f"{format_bytes(plan.total_bytes)}</div>"
        f'<div class="plan-bar" style="display:flex;height:28px;border-radius:6px;overflow:hidden;'
        f'border:1px solid #9ca3af">{"".join(segments)}</div>'
        f'<div style="margin:.4em 0">{"".join(legend)}</div>'
        f'<div class="plan-summary" style="font-family:monospace;font-size:.85em">{escape(plan.summary)}</div>'
        f"{notes}{budgets}</div>"
    )


def error_html(message: str, title: str = "Does not fit") -> str:
    """A plain, visible box for a plan that cannot be made (does not fit, bad model, bad budget)."""
    return (
        '<div class="plan-preview" data-fits="false" style="border:2px solid #dc2626;border-radius:6px;'
        'padding:.6em;background:rgba(220,38,38,.08)">'
        f'<div style="font-weight:700;color:#dc2626">{escape(title)}</div>'
        f'<div class="plan-error">{escape(message)}</div></div>'
    )


# Code spans and fences: their text is shown verbatim by the Markdown renderer already.
_CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]*`)", re.S)


def chat_display(text: str) -> str:
    """Text as the chat shows it: HTML outside code is escaped, so `<script>` or `<img onerror=...>`
    from a user or a model is displayed as text and never becomes markup."""
    parts = _CODE.split(text)
    return "".join(part if i % 2 else html.escape(part, quote=False) for i, part in enumerate(parts))


def chat_raw(text: str) -> str:
    """The inverse of chat_display: the text the model wrote or the user typed."""
    parts = _CODE.split(text)
    return "".join(part if i % 2 else html.unescape(part) for i, part in enumerate(parts))
