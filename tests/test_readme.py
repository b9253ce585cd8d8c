"""README's Python examples, checked against the app and the library so that they cannot drift.

Fast: every endpoint call of the API example has the endpoint's number of arguments and unpacks its
number of outputs, and the example's streaming loop, run against the app, prints every step. With
--full: both examples run as a reader would run them."""

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest
from gradio_client import Client

README = Path(__file__).resolve().parent.parent / "README.md"
LOCAL_URL = "http://127.0.0.1:7860/"  # what the API example connects to; the test's own server replaces it
API_MARKER = "from gradio_client import Client"
LIBRARY_MARKER = "from explainer import"
STEP_LINE = re.compile(r"^(\d+) \d+ \S+ \{")  # the streaming loop's print: step, timestep, sigma, {word: score}
STEPS = 20  # the example's run


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def example(marker: str) -> str:
    found = [code for code in python_blocks() if marker in code]
    assert len(found) == 1, f"README should have one ```python block with {marker!r}, has {len(found)}"
    return found[0]


def api_example(url: str) -> str:
    code = example(API_MARKER)
    assert LOCAL_URL in code
    return code.replace(LOCAL_URL, url)


def run_printing(code: str | ast.Module) -> str:
    """Run ``code`` as a script of its own; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    return printed.getvalue()


def printed_steps(printed: str) -> list[int]:
    return [int(match.group(1)) for line in printed.splitlines() if (match := STEP_LINE.match(line))]


def unpacked(target: ast.expr) -> tuple[int, bool]:
    """How many outputs an assignment or loop target takes, and whether a starred name takes the rest."""
    if isinstance(target, ast.Tuple):
        return len(target.elts), any(isinstance(e, ast.Starred) for e in target.elts)
    return 1, False


def endpoint_calls(code: str) -> list[tuple[str, int, tuple[int, bool] | None]]:
    """(api_name, positional arguments, what its result is unpacked into) for every call that names an endpoint."""
    tree = ast.parse(code)
    jobs = {}  # a name bound to client.submit(...): its loop unpacks the streamed outputs
    targets = {}  # id(call) -> unpacking
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                jobs[node.targets[0].id] = node.value
            targets[id(node.value)] = unpacked(node.targets[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Name) and node.iter.id in jobs:
            targets[id(jobs[node.iter.id])] = unpacked(node.target)
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            names = {k.arg: k.value for k in node.keywords}
            if "api_name" in names:
                assert not any(isinstance(a, ast.Starred) for a in node.args)
                assert set(names) == {"api_name"}, "README passes endpoint arguments by position"
                calls.append((ast.literal_eval(names["api_name"]), len(node.args), targets.get(id(node))))
    return calls


def test_every_python_example_of_the_readme_is_checked_here():
    blocks = python_blocks()
    assert len(blocks) == 2, "a new ```python block in README needs a test here"
    assert sum(API_MARKER in code for code in blocks) == sum(LIBRARY_MARKER in code for code in blocks) == 1


def test_the_api_example_calls_every_endpoint_with_its_arguments_and_outputs(url):
    endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    calls = endpoint_calls(api_example(url))
    assert {name for name, *_ in calls} == set(endpoints), "README's example should show every endpoint"
    for name, arguments, unpacking in calls:
        assert arguments == len(endpoints[name]["parameters"]), (name, [p["parameter_name"] for p in endpoints[name]["parameters"]])
        outputs = len(endpoints[name]["returns"])
        assert unpacking is not None, f"README's {name} call should unpack its {outputs} outputs"
        count, starred = unpacking
        assert (count - 1 <= outputs) if starred else (count == outputs), (name, unpacking, outputs)


def test_the_api_examples_streaming_loop_prints_every_step(url):
    tree = ast.parse(api_example(url))
    loop = next(i for i, node in enumerate(tree.body) if isinstance(node, ast.For))  # the /denoise loop
    printed = run_printing(ast.Module(body=tree.body[: loop + 1], type_ignores=[]))
    assert printed_steps(printed) == list(range(1, STEPS + 1)), printed  # every step, once each, in order


@pytest.mark.slow
def test_the_api_example_runs_as_written(url):
    printed = run_printing(api_example(url))
    assert printed_steps(printed) == list(range(1, STEPS + 1)), printed


@pytest.mark.slow
def test_the_library_example_runs_as_written():
    printed = run_printing(example(LIBRARY_MARKER))
    labels = [line for line in printed.splitlines() if line.startswith("step ")]
    assert len(labels) == STEPS and labels[-1].startswith(f"step {STEPS} of {STEPS}"), printed


def front_matter() -> dict:
    import yaml

    return yaml.safe_load(README.read_text(encoding="utf-8").split("---\n")[1])


SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})(\.safetensors)$")
NOT_LOADED = {"safety_checker", "feature_extractor", "image_encoder"}  # pipeline parts the app never loads


def test_the_space_preloads_whole_pipelines_of_allowed_ungated_models():
    """Each ``preload_from_hub`` line names an ungated Hub model of the config and, for every part its
    family's pipeline loads, a config and the weights (every shard of a sharded file, and its index):
    a part left out would download on a visitor's first run; a gated repository would fail the build."""
    import diffusers

    from explainer import config
    from explainer.families import family

    front = front_matter()
    lines = [line.split() for line in front["preload_from_hub"]]
    assert {model_id for model_id, _ in lines} <= set(front["models"])
    for model_id, listed in lines:
        spec = config.model_spec(model_id)
        assert spec.hub and not spec.gated, model_id
        files = listed.split(",")
        pipeline = getattr(diffusers, family(spec.family).pipeline_class)
        parts = set(diffusers.DiffusionPipeline._get_signature_keys(pipeline)[0]) - NOT_LOADED
        assert {name.split("/")[0] for name in files if "/" in name} == parts, model_id
        assert "model_index.json" in files
        for part in parts - {"scheduler"} - {name for name in parts if name.startswith("tokenizer")}:
            assert f"{part}/config.json" in files and any(f.startswith(f"{part}/") and f.endswith(".safetensors") for f in files), part
        for name in files:
            shard = SHARD.match(name)
            if shard:
                stem, _, total, suffix = shard.groups()
                assert {f"{stem}-{i:05d}-of-{total}{suffix}" for i in range(1, int(total) + 1)} <= set(files)
                assert f"{stem}{suffix}.index.json" in files, name
