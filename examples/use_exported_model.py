"""Use a MoT model exported with `mot export RUN --format hf --out FOLDER`, with nothing of mot
installed: only torch, transformers and Pillow.

    python examples/use_exported_model.py exports/chameleon_mot data/captioned_images/mnist/images/00026.png

Captions the image, then draws an image for a caption ("handwritten digit seven") into
drawn.png next to the folder.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

folder, image_file = sys.argv[1], sys.argv[2]
caption = sys.argv[3] if len(sys.argv) > 3 else "handwritten digit seven"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

# image -> caption: the image's span is the prompt; only text is generated, up to end-of-text
inputs = processor([("image", image_file)])
ids = model.generate(**inputs, max_new_tokens=24, do_sample=False, allowed_modalities=["text"],
                     eos_token_id=processor.stop_id("text"), pad_token_id=processor.stop_id("text"))
print("caption:", processor.decode(ids[0, inputs["input_ids"].shape[1]:])[0][1])

# caption -> image: the caption, then the begin-of-image marker; generate() keeps the span whole,
# with classifier-free guidance against the marker alone (as `mot generate --cfg 3`)
inputs = processor.span_prompt([caption], "image")
torch.manual_seed(0)
ids = model.generate(**inputs, max_new_tokens=processor.modalities["image"]["length"] + 1, do_sample=True,
                     top_k=50, guidance_scale=3.0, negative_prompt_ids=processor.unconditional_ids("image"),
                     pad_token_id=processor.stop_id("text"))
(name, image), = processor.decode(ids[0, inputs["input_ids"].shape[1]:])
out = Path(folder).resolve().parent / "drawn.png"
image.resize((128, 128)).save(out)
print(f"drew {caption!r} ({name}) into {out}")
