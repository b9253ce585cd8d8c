"""Diffusion X-Ray: the Gradio app. Layout and event wiring only; all computing is in explainer/."""

from __future__ import annotations

import gradio as gr
import spaces

from explainer import config, plots, views
from explainer.models import load_model
from explainer.run import RunData, RunSettings, StepRecord, stream_run
from explainer.schedules import parse_timestep_list

DEFAULT_MODEL = config.default_model_id()
DEFAULT_SPEC = config.MODELS[DEFAULT_MODEL]


def _settings(prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom) -> RunSettings:
    chosen = parse_timestep_list(custom) if schedule == "custom" else schedule
    return RunSettings(
        prompt=prompt,
        negative_prompt=negative or "",
        seed=int(seed),
        steps=int(steps),
        guidance=float(guidance),
        width=int(width),
        height=int(height),
        schedule=chosen,
        lam=float(lam),
    )


def _gpu_duration(model_id, settings_dict) -> int:
    spec = config.model_spec(model_id)
    return config.gpu_seconds(spec, settings_dict["steps"], settings_dict["width"], settings_dict["height"])


@spaces.GPU(duration=_gpu_duration)
def _run_on_device(model_id: str, settings_dict: dict):
    """The only GPU work: yields CPU objects (RunData, then StepRecords, then the finished RunData)."""
    yield from stream_run(load_model(model_id), RunSettings.from_dict(settings_dict))


def _step_outputs(data: RunData, record: StepRecord, opacity: float = 0.8):
    chart = plots.noise_level_chart(data.timesteps, data.noise_levels, current=record.index)
    summary = views.step_summary(data, record) | {"words": data.tokens.word_texts, "messages": data.messages}
    status = f"**{record.label}** · noise level σ = {record.sigma:.3g}"
    if data.messages:
        status += "  \n⚠️ " + " ".join(data.messages)
    return (
        views.for_display(views.step_picture(record, "prediction")),
        views.for_display(views.step_picture(record, "noisy")),
        status,
        chart,
        views.word_overlays(data, record, opacity=opacity),
        summary,
    )


def denoise(model_id, prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom):
    """Run the model and stream every step: prediction view, noisy view, status, noise chart,
    one attention overlay per word, and the step's data (timestep, sigma, per-word scores)."""
    try:
        spec = config.model_spec(model_id)
        settings = _settings(prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom).validated()
        load_model(spec.id)  # fail here, with a message, for a model that cannot load
    except ValueError as error:
        raise gr.Error(str(error)) from error
    data = None
    for item in _run_on_device(spec.id, settings.to_dict()):
        if isinstance(item, StepRecord):
            data.records.append(item)
            last = item.index == item.total  # the scrubber opens with the last step
            slider = gr.update(maximum=item.total, value=item.index, interactive=last)
            yield *_step_outputs(data, item), data, slider
        elif data is None:
            data = item
        else:  # the finished run: keep its final image and reproduction record with our records
            data.final_array, data.final_image, data.reproduction = item.final_array, item.final_image, item.reproduction


def show_step(data: RunData | None, step: int):
    """Scrub back to a recorded step without recomputing."""
    if data is None or not data.records:
        raise gr.Error("Run the model first.")
    index = min(max(int(step), 1), len(data.records))
    return _step_outputs(data, data.records[index - 1])


def _on_model_change(model_id):
    spec = config.model_spec(model_id)
    return (
        gr.update(value=spec.width),
        gr.update(value=spec.height),
        gr.update(value=spec.steps),
        gr.update(value=spec.guidance),
        gr.update(samples=[[p] for p in spec.examples]),
    )


def build_demo() -> gr.Blocks:
    limits = config.LIMITS
    with gr.Blocks(title="Diffusion X-Ray") as demo:
        gr.Markdown(
            "# Diffusion X-Ray\nWatch a text-to-image diffusion model turn noise into an image, step by step: "
            "what it currently believes the image is, and where each word of the prompt is attended."
        )
        if DEFAULT_MODEL == config.TINY_RANDOM_MODEL_ID:
            gr.Markdown(
                "⚠️ **Running on a tiny random model**: the embedded shapes model is not in `assets/` yet, "
                "so the pictures and maps below mean nothing. They show the app working."
            )
        run_state = gr.State(None)
        with gr.Tab("Denoise"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", value=DEFAULT_SPEC.examples[0], max_lines=3)
                    model_id = gr.Dropdown(
                        choices=[(spec.label, spec.id) for spec in config.MODELS.values()],
                        value=DEFAULT_MODEL,
                        label="Model",
                    )
                    with gr.Row():
                        seed = gr.Number(label="Seed (-1: random)", value=config.DEFAULTS.seed, precision=0)
                        steps = gr.Slider(1, limits.max_steps, value=DEFAULT_SPEC.steps, step=1, label="Steps")
                    guidance = gr.Slider(0, limits.max_guidance, value=DEFAULT_SPEC.guidance, step=0.5, label="Guidance")
                    schedule = gr.Radio(
                        ["uniform", "early", "latter", "custom"],
                        value=config.DEFAULTS.schedule,
                        label="Time-step schedule",
                        info="early: dense where noise is high; latter: dense where it is low",
                    )
                    with gr.Accordion("More settings", open=False):
                        negative = gr.Textbox(label="Negative prompt", value="")
                        with gr.Row():
                            width = gr.Slider(limits.min_side, limits.max_side, value=DEFAULT_SPEC.width, step=limits.side_multiple, label="Width")
                            height = gr.Slider(limits.min_side, limits.max_side, value=DEFAULT_SPEC.height, step=limits.side_multiple, label="Height")
                        lam = gr.Slider(0, 200, value=config.DEFAULTS.lam, step=1, label="λ (schedule concentration)")
                        custom = gr.Textbox(label="Custom timesteps (schedule = custom)", placeholder="999, 800, 600, 400, 200, 50")
                    run_button = gr.Button("Run", variant="primary")
                    examples = gr.Dataset(components=[prompt], samples=[[p] for p in DEFAULT_SPEC.examples], label="Examples")
                with gr.Column(scale=2):
                    status = gr.Markdown("Press **Run** to start.")
                    with gr.Row():
                        prediction = gr.Image(label="Prediction view: the clean image the model predicts now", type="pil", height=320)
                        noisy = gr.Image(label="Noisy view: the current latent x_t, decoded", type="pil", height=320)
                    step_slider = gr.Slider(1, DEFAULT_SPEC.steps, value=1, step=1, label="Step (scrub after the run)", interactive=False)
                    with gr.Row():
                        chart = gr.Image(label="Noise level over the steps", show_label=False, type="pil", height=220)
                        step_data = gr.JSON(label="This step's data")
                    overlays = gr.Gallery(label="Cross-attention per word at this step", columns=6, height=220)

        outputs = [prediction, noisy, status, chart, overlays, step_data]
        inputs = [model_id, prompt, negative, seed, steps, guidance, width, height, schedule, lam, custom]
        run_button.click(denoise, inputs, outputs + [run_state, step_slider], api_name="denoise", concurrency_limit=limits.max_concurrent_runs)
        step_slider.release(show_step, [run_state, step_slider], outputs, api_visibility="private")
        model_id.change(_on_model_change, model_id, [width, height, steps, guidance, examples], api_visibility="private")
        examples.click(lambda sample: sample[0], examples, prompt, api_visibility="private")
    demo.queue(max_size=limits.max_queue, default_concurrency_limit=limits.max_concurrent_runs)
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch()
