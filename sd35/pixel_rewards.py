"""The rewards that read uint8 pixels on the CPU: OCR and JPEG compressibility. Each is
`reward(pixels [B, H, W, 3] uint8, prompts, metadata) -> [B] floats`, with numpy, PIL and the OCR
engine alone: no torch, so that the scoring worker processes (sd35/workers.py) start fast and small.
sd35/rewards.py wraps them for image tensors.
"""
import io
import re

from PIL import Image


def encoded(image, **options):
    """The bytes of a PIL image saved with `options` (format=..., quality=...)."""
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def levenshtein(a, b):
    """Edit distance: the fewest single-character insertions, deletions and substitutions turning a into b."""
    previous = list(range(len(b) + 1))  # previous[j] = distance(a[:i-1], b[:j])
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_target(prompt, metadata):
    """The text an image should show: metadata["text"] if present, else the first "double-quoted" span."""
    if "text" in metadata:
        return str(metadata["text"])
    quoted = re.search(r'"([^"]*)"', prompt)
    if quoted is None:
        raise ValueError('no target text: put the text in double quotes or set metadata["text"]')
    return quoted.group(1)


def ocr_similarity(recognised, target):
    """max(0, 1 - edit_distance / len(target)) on the strings lowercased without whitespace (case
    and spacing are the least reliable parts of OCR output): 1 for a perfect match."""
    recognised, target = ("".join(text.lower().split()) for text in (recognised, target))
    if not target:
        raise ValueError("the target text is empty after removing whitespace")
    return max(0.0, 1.0 - levenshtein(recognised, target) / len(target))


class OcrReward:
    """How well the text in each image matches the text the prompt asks for, in [0, 1], as RapidOCR
    (PP-OCR's ONNX models inside its wheel, offline on the CPU) reads it."""

    def __init__(self, threads=0):
        from rapidocr import RapidOCR  # here: building the ONNX sessions takes a moment
        self.engine = RapidOCR(params={"Global.log_level": "error",  # 0 threads: every core
                                       "EngineConfig.onnxruntime.intra_op_num_threads": threads or -1})

    def __call__(self, pixels, prompts, metadata):
        # As PIL images: the engine takes a bare array for OpenCV's BGR order.
        return [ocr_similarity("".join(self.engine(Image.fromarray(image)).txts or ()), ocr_target(prompt, meta))
                for image, prompt, meta in zip(pixels, prompts, metadata)]


def jpeg_compressibility(pixels, prompts, metadata):
    """Minus the JPEG size (quality 95) in kB: DDPO's toy reward, cheap and easy to hack (flat
    images win), so reward hacking shows quickly."""
    return [-len(encoded(Image.fromarray(image), format="JPEG", quality=95)) / 1000 for image in pixels]


# name -> constructor(threads); what a scoring worker can build.
PIXEL_REWARDS = {"ocr": OcrReward, "jpeg_compressibility": lambda threads: jpeg_compressibility}
