"""GPU benchmark: our MLX engine against diffusers on real-size random-weight models, one table.

    python bench/gpu_compare.py [--cases sd15,sdxl,flux-schnell,flux-schnell-4bit,zimage-turbo] [--rounds 3]
                                [--budget 480 | --deadline EPOCH] [--work DIR] [--dry-run]

What bench/gpu.sh runs once it has made its venv (MLX's CUDA build, torch's CUDA wheel): each case builds a
diffusers pipeline at the release's configs with random weights, on the GPU in the case's dtype, and converts
those very weights with our converter (`write_model`, as `convert` does; FLUX.1-schnell 4-bit as `--quantize
4`), so both engines run the same model. Each engine lives in its own child process (`--child torch|mlx`),
both kept loaded, and they take turns: one round is an image from each, `--rounds` times, after a 2-step
warm-up each (MLX compiles its kernels on first use). Per image: prompt encoding, the steps, the VAE decode,
the PIL image. Per step: the median time between consecutive steps' ends (diffusers' step-end callback with
a device synchronise; ours between the pipeline's per-step yields, which evaluate the latents). Peak memory
over the timed rounds, weights included: `mx.get_peak_memory()` and `torch.cuda.max_memory_allocated()`.

Time: `--deadline` (gpu.sh passes its start + 8 min) or `--budget` seconds from now. Each case gets an even
share of what is left; rounds stop when the next would not fit (at least one), and cases left when time is
out are skipped and named. Every wait on a child has the time left as its limit, so nothing hangs.
`--dry-run`: the same steps on the CPU with tiny configs and 3-step images, one round (no GPU, no venv).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import dit_memory  # noqa: E402
from common import print_table  # noqa: E402
from flux import CLIP_L, FLUX_DEV_TRANSFORMER, FLUX_VAE, T5_XXL  # noqa: E402
from realsize_parity import CLIP_OPENCLIP_BIGG, CLIP_VIT_L, UNET_SD15, UNET_SDXL, VAE_SD15, VAE_SDXL  # noqa: E402

from mlx_sd_server.engine.families.flux.single_file import SCHNELL_SCHEDULER  # noqa: E402
from mlx_sd_server.engine.families.zimage.single_file import TURBO_SCHEDULER  # noqa: E402

GB = 1e9
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
REPLY = "@@ "  # a child's answers on stdout start with this; anything else there is library noise
DEFAULT_WORK = Path(tempfile.gettempdir()) / "mlx-sd-gpu-bench"
WARMUP_STEPS = 2
MIN_CASE_S = 30  # a case is not started with less than this left

# Z-Image-Turbo's text encoder: Qwen/Qwen3-4B's widths, read as Qwen3Model as its pipeline does (tied embeddings).
QWEN3_4B = dit_memory.QWEN3_4B | {"architectures": ["Qwen3Model"], "tie_word_embeddings": True}
SD_SCHEDULER = {  # SD 1.5's and SDXL's scheduler_config.json (euler here, as ours)
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
}

# --dry-run: each component's config with these values over the release's (same classes, tiny widths).
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "projection_dim": 32}
TINY_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "sample_size": 8,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
TINY_UNET_XL = {**TINY_UNET, "cross_attention_dim": 64, "attention_head_dim": [2, 4],
                "transformer_layers_per_block": [1, 1], "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 1}
TINY_FLUX = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
             "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 32, "pooled_projection_dim": 32}
TINY_QWEN3 = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2,
              "head_dim": 32, "num_hidden_layers": 2}
TINY_ZIMAGE = {"dim": 64, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "n_refiner_layers": 1, "cap_feat_dim": 64,
               "axes_dims": [8, 12, 12]}


@dataclass(frozen=True)
class Case:
    """A released model as the benchmark runs it."""

    title: str  # the table's column (15 characters at most)
    name: str  # the converted model's name (our variant detection reads it: turbo, schnell)
    pipeline: str  # diffusers' pipeline class
    components: dict[str, dict]  # diffusers component -> its released config.json
    tiny: dict[str, dict]  # component -> --dry-run's values over its config
    tokenizers: dict[str, str]  # text encoder -> tokenizer kind (see write_tokenizer)
    scheduler: tuple[str, dict]  # diffusers scheduler class and config
    dtype: str
    size: tuple[int, int]
    steps: int
    cfg_scale: float  # ours; diffusers' own guidance in `reference`
    reference: dict = field(default_factory=dict)  # diffusers' call arguments beyond prompt, size and steps
    quantize: int | None = None  # our conversion's --quantize (diffusers runs the case's dtype)
    torch_of: str | None = None  # the case whose diffusers child (and model) this one shares


SD15 = Case(
    "SD 1.5 512", "sd15", "StableDiffusionPipeline",
    {"text_encoder": CLIP_VIT_L, "unet": UNET_SD15, "vae": VAE_SD15},
    {"text_encoder": TINY_CLIP, "unet": TINY_UNET, "vae": TINY_VAE},
    {"text_encoder": "clip"}, ("EulerDiscreteScheduler", SD_SCHEDULER),
    "float16", (512, 512), 20, 7.0, {"guidance_scale": 7.0, "negative_prompt": ""},
)
SDXL = Case(
    "SDXL 1024", "sdxl", "StableDiffusionXLPipeline",
    {"text_encoder": CLIP_VIT_L, "text_encoder_2": CLIP_OPENCLIP_BIGG, "unet": UNET_SDXL, "vae": VAE_SDXL},
    {"text_encoder": TINY_CLIP, "text_encoder_2": TINY_CLIP, "unet": TINY_UNET_XL, "vae": TINY_VAE},
    {"text_encoder": "clip", "text_encoder_2": "openclip"}, ("EulerDiscreteScheduler", SD_SCHEDULER),
    "float16", (1024, 1024), 20, 7.0, {"guidance_scale": 7.0, "negative_prompt": ""},
)
FLUX_SCHNELL = Case(
    "FLUX.1s bf16", "flux1-schnell", "FluxPipeline",
    {"text_encoder": CLIP_L, "text_encoder_2": T5_XXL, "transformer": FLUX_DEV_TRANSFORMER | {"guidance_embeds": False},
     "vae": FLUX_VAE},
    {"text_encoder": TINY_CLIP, "text_encoder_2": TINY_T5, "transformer": TINY_FLUX, "vae": TINY_VAE},
    {"text_encoder": "clip", "text_encoder_2": "t5"}, ("FlowMatchEulerDiscreteScheduler", SCHNELL_SCHEDULER),
    "bfloat16", (1024, 1024), 4, 1.0, {"guidance_scale": 0.0, "max_sequence_length": 256},
)
CASES = {
    "sd15": SD15,
    "sdxl": SDXL,
    "flux-schnell": FLUX_SCHNELL,
    "flux-schnell-4bit": dataclasses.replace(FLUX_SCHNELL, title="FLUX.1s 4-bit", quantize=4,
                                             torch_of="flux-schnell"),
    "zimage-turbo": Case(
        "Z-Image-Turbo", "z-image-turbo", "ZImagePipeline",
        {"text_encoder": QWEN3_4B, "transformer": dit_memory.ZIMAGE_TURBO, "vae": FLUX_VAE},
        {"text_encoder": TINY_QWEN3, "transformer": TINY_ZIMAGE, "vae": TINY_VAE},
        {"text_encoder": "qwen3"}, ("FlowMatchEulerDiscreteScheduler", TURBO_SCHEDULER),
        "bfloat16", (1024, 1024), 8, 1.0, {"guidance_scale": 0.0},
    ),
}


def configs(case: Case, dry_run: bool) -> dict[str, dict]:
    return {name: config | (case.tiny[name] if dry_run else {}) for name, config in case.components.items()}


def settings(case: Case, dry_run: bool) -> tuple[tuple[int, int], int]:
    """(image size, steps): the case's, or --dry-run's 64x64 and 3 steps."""
    return ((64, 64), 3) if dry_run else (case.size, case.steps)


# --- the diffusers child -------------------------------------------------------------------------------

def write_tokenizer(kind: str, folder: Path) -> Path:
    """A tokenizer folder that transformers and our converter both read: CLIP's real vocabulary (OpenAI's pad
    token, or OpenCLIP's "!"), or the tests' small T5 and Qwen3 tokenizers (no hub download; their ids fit
    the real vocabularies, and both engines read the same tokens)."""
    if kind in ("clip", "openclip"):
        from mlx_sd_server.engine.text.clip_tokenizer import CLIPTokenizer, default_vocab_path

        pad_token = "!" if kind == "openclip" else "<|endoftext|>"
        CLIPTokenizer.from_bpe_file(default_vocab_path(), pad_token=pad_token).save(folder)
        return folder
    if kind == "t5":
        import tiny_t5

        return tiny_t5.write_t5_tokenizer(folder)
    import tiny_qwen3

    return tiny_qwen3.write_qwen3_tokenizer(folder)


def transformers_tokenizer(kind: str, folder: Path):
    import transformers

    if kind == "t5":
        return transformers.T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    return getattr(transformers, "Qwen2TokenizerFast" if kind == "qwen3" else "CLIPTokenizer").from_pretrained(
        str(folder))


def build_module(config: dict, device: str, dtype):
    """A diffusers or transformers module of the config's class, random weights, built on `device` in `dtype`."""
    import diffusers
    import torch
    import transformers

    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if "architectures" in config:
                cls = getattr(transformers, config["architectures"][0])
                return cls(cls.config_class.from_dict(config)).eval()
            return getattr(diffusers, config["_class_name"]).from_config(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


class TorchChild:
    """The diffusers pipeline of a case, built at start; converts its weights and times images on demand."""

    def __init__(self, case: Case, dry_run: bool, work: Path):
        import diffusers
        import torch

        self.torch = torch
        self.case, self.dry_run = case, dry_run
        self.device = "cpu" if dry_run else "cuda"
        torch.manual_seed(0)
        dtype = getattr(torch, case.dtype)
        self.configs = configs(case, dry_run)
        self.modules = {name: build_module(config, self.device, dtype) for name, config in self.configs.items()}
        modules: dict[str, Any] = dict(self.modules)
        self.tokenizer_folders = {}
        for encoder, kind in case.tokenizers.items():
            folder = work / f"tokenizer-{kind}"
            shutil.rmtree(folder, ignore_errors=True)  # (a folder of another kind's files would be read as this)
            folder = write_tokenizer(kind, folder)
            self.tokenizer_folders[encoder] = folder
            modules["tokenizer" + encoder.removeprefix("text_encoder")] = transformers_tokenizer(kind, folder)
        scheduler_class, scheduler_config = case.scheduler
        modules["scheduler"] = getattr(diffusers, scheduler_class)(**scheduler_config)
        cls = getattr(diffusers, case.pipeline)
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
                 "add_watermarker": False}
        accepted = inspect.signature(cls.__init__).parameters
        self.pipe = cls(**modules, **{key: value for key, value in extra.items() if key in accepted})
        self.pipe.set_progress_bar_config(disable=True)

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"

    def convert(self, folder: str, quantize: int | None) -> dict:
        """Our converted folder of these very weights (the converter's own code, from memory, not disk)."""
        import mlx.core as mx

        from convert.diffusers_folder import family_of
        from convert.model import write_model
        from mlx_sd_server.engine.source import SourceModel

        mx.set_cache_limit(0)  # (this process times diffusers: the conversion's buffers go back as they are freed)
        start = time.perf_counter()
        spec, family = family_of(self.configs)

        def weights(module):
            for key, tensor in module.state_dict().items():
                yield key, tensor.detach().float().cpu().numpy()

        source = SourceModel(
            family=family,
            prediction_type=spec.parameterization or self.case.scheduler[1].get("prediction_type", "epsilon"),
            scheduler=self.case.scheduler[1],
            components={name: (config, weights(self.modules[name])) for name, config in self.configs.items()},
            tokenizers=dict(self.tokenizer_folders),
        )
        shutil.rmtree(folder, ignore_errors=True)
        write_model(source, Path(folder), name=self.case.name, dtype=self.case.dtype, quantize=quantize,
                    progress=False)
        mx.clear_cache()
        return {"convert_s": time.perf_counter() - start}

    def image(self, steps: int) -> dict:
        (width, height), _ = settings(self.case, self.dry_run)
        ends: list[float] = []

        def on_step_end(_pipe, _index, _timestep, tensors):
            self.sync()
            ends.append(time.perf_counter())
            return tensors

        generator = self.torch.Generator(self.device).manual_seed(0)
        start = time.perf_counter()
        with self.torch.inference_mode():
            self.pipe(PROMPT, width=width, height=height, num_inference_steps=steps, generator=generator,
                      callback_on_step_end=on_step_end, **self.case.reference)
        self.sync()
        return {"image_s": time.perf_counter() - start, "step_ends": ends}

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.device == "cuda" else None

    def after_image(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.empty_cache()  # (a cached pool would crowd the MLX process on the same GPU)


# --- the MLX child -------------------------------------------------------------------------------------

class MLXChild:
    """Our pipeline on a converted folder, as `serve` loads it."""

    def __init__(self, case: Case, dry_run: bool, folder: str):
        import mlx.core as mx

        from mlx_sd_server.engine.families import capabilities
        from mlx_sd_server.engine.model_io import load_model, read_manifest
        from mlx_sd_server.engine.pipeline import DiffusionPipeline

        self.mx, self.case, self.dry_run = mx, case, dry_run
        self.manifest = read_manifest(folder)
        self.capabilities = capabilities(self.manifest)
        self.pipeline = DiffusionPipeline(load_model(folder, dtype=case.dtype))

    def device_name(self) -> str:
        return str(self.mx.default_device())

    def image(self, steps: int) -> dict:
        from mlx_sd_server.job import ModelDefaults, build_job

        (width, height), _ = settings(self.case, self.dry_run)
        job = build_job({"prompt": PROMPT, "width": width, "height": height, "steps": steps,
                         "cfg_scale": self.case.cfg_scale, "sample_method": "euler", "seed": 0},
                        defaults=ModelDefaults(**self.manifest["defaults"]), capabilities=self.capabilities)
        ends = []
        start = time.perf_counter()
        steps_run = self.pipeline.generate(job)
        try:
            while True:
                next(steps_run)
                ends.append(time.perf_counter())
        except StopIteration:
            pass
        return {"image_s": time.perf_counter() - start, "step_ends": ends}

    def reset_peak(self) -> None:
        self.mx.clear_cache()
        self.mx.reset_peak_memory()

    def peak(self) -> int:
        return self.mx.get_peak_memory()

    def after_image(self) -> None:
        self.mx.clear_cache()


def serve_child(engine: str, case: Case, dry_run: bool, work: Path, folder: str | None) -> None:
    """A child's loop: build (and say so), then answer commands from stdin, one JSON line each."""

    def reply(**message) -> None:
        print(REPLY + json.dumps(message), flush=True)

    start = time.perf_counter()
    child = TorchChild(case, dry_run, work) if engine == "torch" else MLXChild(case, dry_run, str(folder))
    reply(ready=time.perf_counter() - start, device=child.device_name())
    _, steps = settings(case, dry_run)
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "convert":
            assert isinstance(child, TorchChild)
            reply(**child.convert(command["folder"], command.get("quantize")))
        elif command["do"] == "warmup":
            child.image(WARMUP_STEPS)
            child.after_image()
            child.reset_peak()
            reply(done=True)
        elif command["do"] == "image":
            result = child.image(steps)
            child.after_image()
            if len(result["step_ends"]) != steps:  # (the per-step time reads one end per step)
                raise RuntimeError(f"{engine}: {len(result['step_ends'])} step ends for {steps} steps")
            reply(**result)
        elif command["do"] == "peak":
            reply(peak=child.peak())
        elif command["do"] == "quit":
            return


# --- the parent ----------------------------------------------------------------------------------------

class OutOfTime(Exception):
    pass


class ChildFailed(Exception):
    pass


class Child:
    """A child process and its answers, each awaited no longer than the time left."""

    def __init__(self, arguments: list[str], log: Path, deadline: float):
        self.log, self.deadline = log, deadline
        self.stderr = open(log, "a")  # noqa: SIM115 (open for the child's life)
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *arguments], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(REPLY):
                self.answers.put(line[len(REPLY):])
        self.answers.put(None)  # the child exited

    def answer(self) -> dict:
        left = self.deadline - time.time()
        try:
            line = self.answers.get(timeout=max(left, 0.1))
        except queue.Empty:
            raise OutOfTime from None
        if line is None:
            self.process.wait(timeout=10)
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise ChildFailed(f"exit status {self.process.returncode}; the end of {self.log}:\n{tail}")
        return json.loads(line)

    def ask(self, **command) -> dict:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # (answer() reports the exit)
        return self.answer()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"do": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=20)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.process.kill()
                self.process.wait()
        self.stderr.close()


@dataclass
class Result:
    rounds: int = 0
    step: dict[str, list[float]] = field(default_factory=lambda: {"mlx": [], "torch": []})
    image: dict[str, list[float]] = field(default_factory=lambda: {"mlx": [], "torch": []})
    peak: dict[str, float | None] = field(default_factory=dict)
    note: str = ""


def step_seconds(answer: dict) -> float:
    """The median time between consecutive steps' ends (the first step also encodes the prompt)."""
    ends = answer["step_ends"]
    return statistics.median(b - a for a, b in zip(ends, ends[1:])) if len(ends) > 1 else answer["image_s"]


def run_rounds(mlx: Child, torch_child: Child, result: Result, rounds: int, case_deadline: float) -> None:
    """Alternate images, MLX then diffusers, until `rounds` or the case's share of the time is spent."""
    for child in (mlx, torch_child):
        child.ask(do="warmup")
    while result.rounds < rounds:
        start = time.time()
        for engine, child in (("mlx", mlx), ("torch", torch_child)):
            answer = child.ask(do="image")
            result.step[engine].append(step_seconds(answer))
            result.image[engine].append(answer["image_s"])
        result.rounds += 1
        if time.time() + (time.time() - start) > case_deadline:
            break
    for engine, child in (("mlx", mlx), ("torch", torch_child)):
        result.peak[engine] = child.ask(do="peak")["peak"]


def run_cases(names: list[str], args, deadline: float) -> tuple[dict[str, Result], list[str], dict[str, str]]:
    """Every case in turn; a diffusers child is kept for the cases that share it (FLUX.1-schnell's two)."""
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    log.write_text("")
    results: dict[str, Result] = {}
    devices: dict[str, str] = {}
    skipped: list[str] = []
    torch_children: dict[str, Child] = {}
    common = ["--work", str(work)] + (["--dry-run"] if args.dry_run else [])
    try:
        for index, name in enumerate(names):
            case = CASES[name]
            left = deadline - time.time()
            if left < (0 if args.dry_run else MIN_CASE_S):
                skipped += names[index:]
                break
            case_deadline = time.time() + left / (len(names) - index)
            result = results[name] = Result()
            folder = work / name
            mlx = None
            try:
                owner = case.torch_of or name
                if owner not in torch_children:
                    for other in list(torch_children):
                        torch_children.pop(other).stop()
                    print(f"{name}: building the diffusers pipeline ...", file=sys.stderr, flush=True)
                    torch_children[owner] = Child(["--child", "torch", "--case", owner, *common], log, deadline)
                    devices["torch"] = torch_children[owner].answer()["device"]
                torch_child = torch_children[owner]
                quantized = f" (--quantize {case.quantize})" if case.quantize else ""
                print(f"{name}: converting{quantized} ...", file=sys.stderr, flush=True)
                torch_child.ask(do="convert", folder=str(folder), quantize=case.quantize)
                mlx = Child(["--child", "mlx", "--case", name, "--folder", str(folder), *common], log, deadline)
                devices["mlx"] = mlx.answer()["device"]
                print(f"{name}: rounds ...", file=sys.stderr, flush=True)
                run_rounds(mlx, torch_child, result, args.rounds, case_deadline)
            except OutOfTime:
                result.note = "out of time"
                skipped += names[index + 1:]
                break
            except ChildFailed as error:
                result.note = "failed"
                print(f"{name}: a child failed: {error}", file=sys.stderr, flush=True)
                for other in [o for o, child in torch_children.items() if child.process.poll() is not None]:
                    torch_children.pop(other).stop()  # (a diffusers child still alive serves the next case)
            finally:
                if mlx is not None:
                    mlx.stop()
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        for child in torch_children.values():
            child.stop()
    return results, skipped, devices


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(names: list[str], results: dict[str, Result], skipped: list[str], devices: dict[str, str],
           args, elapsed: float) -> None:
    def versions(*packages: str) -> str:
        found = []
        for package in packages:
            try:
                found.append(f"{package} {metadata.version(package)}")
            except metadata.PackageNotFoundError:
                continue
        return ", ".join(found)

    shown = [n for n in names if n in results]

    def row(label: str, values: list[float | None], number_format: str):
        return label, values, number_format

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    step = {e: [median(results[n].step[e]) for n in shown] for e in ("mlx", "torch")}
    image = {e: [median(results[n].image[e]) for n in shown] for e in ("mlx", "torch")}
    peak = {e: [None if results[n].peak.get(e) is None else results[n].peak[e] / GB for n in shown]
            for e in ("mlx", "torch")}
    rows = [
        row("step, MLX (s)", step["mlx"], ".3f"),
        row("step, diffusers (s)", step["torch"], ".3f"),
        row("step, MLX/diffusers", [ratio(a, b) for a, b in zip(step["mlx"], step["torch"])], ".2f"),
        row("image, MLX (s)", image["mlx"], ".2f"),
        row("image, diffusers (s)", image["torch"], ".2f"),
        row("image, MLX/diffusers", [ratio(a, b) for a, b in zip(image["mlx"], image["torch"])], ".2f"),
        row("peak memory, MLX (GB)", peak["mlx"], ".2f"),
        row("peak memory, diffusers (GB)", peak["torch"], ".2f"),
        row("rounds", [float(results[n].rounds) for n in shown], ".0f"),
    ]
    mode = "--dry-run: tiny models on the CPU, 64x64, 3 steps" if args.dry_run else "real-size random weights"
    print(f"\nMLX ({devices.get('mlx', '?')}) against diffusers ({devices.get('torch', '?')}); {mode}; "
          f"medians of alternating rounds; {elapsed:.0f} s in all")
    print(versions("mlx", "mlx-cuda-12", "mlx-cuda-13", "torch", "diffusers", "transformers"))
    print_table("", [CASES[n].title for n in shown], rows)
    for name in shown:
        case = CASES[name]
        (width, height), steps = settings(case, args.dry_run)
        cfg = f"CFG {case.cfg_scale:g}" if case.cfg_scale > 1 else "no CFG"
        quantized = f", ours {case.quantize}-bit (--quantize {case.quantize}), diffusers {case.dtype}" \
            if case.quantize else ""
        note = f"  [{results[name].note}]" if results[name].note else ""
        print(f"  {case.title}: {width}x{height}, {steps} steps, euler, {cfg}, {case.dtype}{quantized}{note}")
    if skipped:
        print(f"skipped, the time budget spent: {', '.join(CASES[n].title for n in skipped)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {','.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=None, help="images per engine and case (default 3; dry run 1)")
    parser.add_argument("--budget", type=float, default=480, help="seconds from now (default 480)")
    parser.add_argument("--deadline", type=float, help="a time.time() to finish by (gpu.sh: its start + 8 min)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="converted folders and the children's log")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, one round")
    parser.add_argument("--child", choices=["torch", "mlx"], help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, CASES[args.case], args.dry_run, args.work, args.folder)
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    args.rounds = args.rounds or (1 if args.dry_run else 3)
    start = time.time()
    deadline = args.deadline or start + args.budget
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results, skipped, devices = run_cases(names, args, deadline)
    report(names, results, skipped, devices, args, time.time() - start)
    return 0 if results and not any(r.note == "failed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
