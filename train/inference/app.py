"""``tristage app EXPORT_DIR``: a local Gradio app around an exported pipeline.

Prompt, number of images and advanced settings (seed fixed or random, negative prompt on/off, a style,
guidance, steps, sampler).  Every click on Generate writes its images and settings into a new folder
``OUT/run_NNNN/``; the gallery shows all images of the session.  Binds 127.0.0.1 unless ``--host``.
For a DiTPipeline export the prompt is a class label and styles / negative prompts do not apply.
Bad input (an empty prompt, a number out of range, an unknown label) shows a message, not a trace.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from tristage.errors import AppError

# Styles: (prompt template, negative prompt).  docs/inference.md lists the same entries
# (tests/unit/test_docs.py compares them).
STYLES: dict[str, tuple[str, str]] = {
    "No style": ("{prompt}", ""),
    "Cinematic": (
        "cinematic still {prompt} . emotional, harmonious, vignette, highly detailed, high budget, bokeh, "
        "cinemascope, moody, epic, gorgeous, film grain, grainy",
        "anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, ugly",
    ),
    "Photographic": (
        "cinematic photo {prompt} . 35mm photograph, film, bokeh, professional, 4k, highly detailed",
        "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly",
    ),
    "Anime": (
        "anime artwork {prompt} . anime style, key visual, vibrant, studio anime, highly detailed",
        "photo, deformed, black and white, realism, disfigured, low contrast",
    ),
    "Manga": (
        "manga style {prompt} . vibrant, high-energy, detailed, iconic, Japanese comic style",
        "ugly, deformed, noisy, blurry, low contrast, realism, photorealistic, Western comic style",
    ),
    "Digital Art": (
        "concept art {prompt} . digital artwork, illustrative, painterly, matte painting, highly detailed",
        "photo, photorealistic, realism, ugly",
    ),
    "Pixel art": (
        "pixel-art {prompt} . low-res, blocky, pixel art style, 8-bit graphics",
        "sloppy, messy, blurry, noisy, highly detailed, ultra textured, photo, realistic",
    ),
    "Fantasy art": (
        "ethereal fantasy concept art of {prompt} . magnificent, celestial, ethereal, painterly, epic, "
        "majestic, magical, fantasy art, cover art, dreamy",
        "photographic, realistic, realism, 35mm film, dslr, cropped, frame, text, deformed, glitch, noise",
    ),
    "Neonpunk": (
        "neonpunk style {prompt} . cyberpunk, vaporwave, neon, vibes, vibrant, stunningly beautiful, crisp, "
        "detailed, sleek, ultramodern, magenta highlights, dark purple shadows, high contrast, cinematic",
        "painting, drawing, illustration, glitch, deformed, mutated, cross-eyed, ugly, disfigured",
    ),
    "3D Model": (
        "professional 3d model {prompt} . octane render, highly detailed, volumetric, dramatic lighting",
        "ugly, deformed, noisy, low poly, blurry, painting",
    ),
}
MAX_IMAGES, MAX_STEPS, MAX_GUIDANCE = 8, 100, 20.0


@dataclass
class Request:
    """One click on Generate."""

    prompt: str
    num_images: float = 1
    seed: float = 0
    random_seed: bool = False
    use_negative: bool = False
    negative_prompt: str = ""
    style: str = "No style"
    guidance: float = 4.5
    steps: float = 20
    sampler: str = "dpm-solver++"


def styled(prompt: str, style: str, negative: str | None) -> tuple[str, str]:
    """(prompt, negative prompt) after the style template; the user's negative is appended."""
    if style not in STYLES:
        raise AppError(f"unknown style {style!r}")
    template, style_negative = STYLES[style]
    negatives = [n for n in (style_negative, negative) if n]
    return template.format(prompt=prompt), ", ".join(negatives)


def check(req: Request) -> None:
    if not req.prompt or not req.prompt.strip():
        raise AppError("Enter a prompt.")
    if (
        req.num_images is None
        or int(req.num_images) != req.num_images
        or not 1 <= req.num_images <= MAX_IMAGES
    ):
        raise AppError(f"Number of images must be a whole number from 1 to {MAX_IMAGES}.")
    if req.steps is None or not 1 <= req.steps <= MAX_STEPS:
        raise AppError(f"Steps must be from 1 to {MAX_STEPS}.")
    if req.guidance is None or not 0 <= req.guidance <= MAX_GUIDANCE:
        raise AppError(f"Guidance must be from 0 to {MAX_GUIDANCE}.")
    if req.seed is None or req.seed < 0:
        raise AppError("Seed must be >= 0.")


class Generator:
    """The loaded pipeline, the output folder and a lock (one generation at a time)."""

    def __init__(self, export_dir: str | Path, out_dir: str | Path):
        from tristage.train.inference.sample import is_class_conditional, load_pipeline

        self.pipe = load_pipeline(str(export_dir))
        self.class_conditional = is_class_conditional(self.pipe)
        self.out = Path(out_dir)
        self.lock = threading.Lock()

    def new_run_dir(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        n = 1 + max((int(p.name[4:]) for p in self.out.glob("run_*") if p.name[4:].isdigit()), default=0)
        run = self.out / f"run_{n:04d}"
        run.mkdir()
        return run

    def __call__(self, req: Request) -> list[Path]:
        from tristage.train.inference.sample import SampleError, generate, set_sampler, size_of

        check(req)
        seed = random.randrange(2**31) if req.random_seed else int(req.seed)
        prompt, negative = req.prompt.strip(), ""
        if not self.class_conditional:
            prompt, negative = styled(prompt, req.style, req.negative_prompt if req.use_negative else None)
        args = argparse.Namespace(
            seed=seed,
            steps=int(req.steps),
            guidance=float(req.guidance),
            num_images=int(req.num_images),
            negative_prompt=negative,
            width=None,
            height=None,
            aspect=None,
        )
        with self.lock:
            try:
                set_sampler(self.pipe, req.sampler)
                images = generate(self.pipe, prompt, args, *size_of(self.pipe, args))
            except SampleError as err:
                raise AppError(str(err)) from None
            run = self.new_run_dir()
        paths = []
        for i, image in enumerate(images):
            paths.append(run / f"{i:02d}.png")
            image.save(paths[-1])
        settings = {**asdict(req), "seed_used": seed, "full_prompt": prompt, "full_negative": negative}
        (run / "settings.json").write_text(json.dumps(settings, indent=1))
        return paths


def _advanced_settings(gr) -> list:
    """The accordion's controls, in ``Request`` field order after the prompt and image count."""
    from tristage.train.inference.sample import SAMPLERS

    with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
            random_seed = gr.Checkbox(label="Random seed", value=False, elem_id="random-seed")
        with gr.Row():
            use_negative = gr.Checkbox(label="Use negative prompt", value=False, elem_id="use-negative")
            negative = gr.Textbox(label="Negative prompt", elem_id="negative")
        style = gr.Radio(list(STYLES), value="No style", label="Style", elem_id="style")
        with gr.Row():
            guidance = gr.Slider(0, MAX_GUIDANCE, value=4.5, step=0.1, label="Guidance scale")
            steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="steps")
            sampler = gr.Dropdown(sorted(SAMPLERS), value="dpm-solver++", label="Sampler")
    return [seed, random_seed, use_negative, negative, style, guidance, steps, sampler]


def _on_generate(gen: Generator):
    """The Generate handler: (request fields..., gallery so far) -> (gallery, history, message)."""

    def on_generate(*values):
        *fields, past = values
        try:
            paths = gen(Request(*fields))
        except AppError as err:
            return past, past, f"**Error:** {err}"
        shown = past + [str(p) for p in paths]
        return shown, shown, f"Saved {len(paths)} image(s) to `{paths[0].parent}`"

    return on_generate


def build_ui(gen: Generator):
    import gradio as gr

    label = "Class label" if gen.class_conditional else "Prompt"
    with gr.Blocks(title="tristage") as ui:
        gr.Markdown(f"## tristage  \n`{gen.out}` -- each run is saved in a new `run_NNNN/` folder")
        with gr.Row():
            prompt = gr.Textbox(label=label, elem_id="prompt", scale=4)
            num_images = gr.Number(label="Number of images", value=1, precision=0, elem_id="num-images")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        message = gr.Markdown(elem_id="message")
        inputs = [prompt, num_images, *_advanced_settings(gr)]
        gallery = gr.Gallery(label="Outputs of this session", elem_id="gallery", columns=4)
        history = gr.State([])
        button.click(_on_generate(gen), [*inputs, history], [gallery, history, message])
    return ui


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", help="an exported PixArtAlphaPipeline or DiTPipeline folder")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860, help="port of the local web server")
    parser.add_argument("--out", default="app_outputs", help="per-run image folders go here")


def serve(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise AppError("the app needs gradio: pip install 'tristage[app]'") from None
    gen = Generator(args.export_dir, args.out)
    ui = build_ui(gen)
    import gradio as gr

    # System fonts: the page must not wait on a web font from outside (offline machines).
    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])
    ui.queue().launch(
        server_name=args.host, server_port=args.port, share=False, allowed_paths=[str(gen.out)], theme=theme
    )
