"""Labelled contact sheets: rows of images with a caption each, for people to look at."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(rows: list[tuple[str, list[Image.Image | None]]], header: list[str], cell: int = 128) -> Image.Image:
    """A white sheet with one captioned row per ``(caption, images)``; ``header`` labels the columns.

    ``None`` in a row leaves its cell empty, so columns stay aligned.
    """
    font = ImageFont.load_default()
    label_w, head_h, pad = 220, 20, 4
    cols = max((len(imgs) for _, imgs in rows), default=0)
    sheet = Image.new("RGB", (label_w + cols * (cell + pad) + pad, head_h + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j, text in enumerate(header):
        draw.text((label_w + j * (cell + pad) + pad, 4), text, fill="black", font=font)
    for i, (caption, images) in enumerate(rows):
        top = head_h + i * (cell + pad) + pad
        for k, line in enumerate(textwrap.wrap(caption, 34)[: cell // 12]):
            draw.text((pad, top + k * 12), line, fill="black", font=font)
        for j, image in enumerate(images):
            if image is not None:
                sheet.paste(
                    image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                    (label_w + j * (cell + pad) + pad, top),
                )
    return sheet
