"""builtin:tiny-vl learns builtin:shapes, then `deploy` answers an image question from the openai client.

examples/tiny-vl-shapes.yaml is trained until a probe on 100 held-out images (every 100 steps from step
300) reaches PROBE_BAR, with a cap of CAP_STEPS; then `lmforge eval` on 150 other held-out images must
answer well above what an image-blind model can (EVAL_BAR). When the model starts reading the image
depends on the data order (exact match after 500 steps: 0.573, 0.48, 0.48 and 0.353 over data seeds 42,
2, 3 and 1; 0.963 after the recipe's 2,000 steps), so the test trains until the probe says it has,
instead of stopping at a step count that suits one order and one CPU. Then the checkpoint is served by
`lmforge deploy` and asked with base64 images through the official openai client; its answers must be
the engine's. About 2 to 4 minutes on two idle cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CAP_STEPS = 1200
PROBE_BAR = 0.55   # held-out exact match at which training stops; an image-blind model gets about 0.30
EVAL_BAR = 0.45    # on 150 other held-out images (the probe's 100 rows leave a few points of noise)


def _exact_match(model, tokenizer, rows) -> float:
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine

    was_training = model.training
    engine = HfEngine(model_obj=model, tokenizer=tokenizer, max_batch_size=64)
    try:
        outs = engine.infer([InferRequest(messages=r["messages"][:1], images=r["images"]) for r in rows],
                            RequestConfig(max_tokens=8, temperature=0), use_tqdm=False)
    finally:
        model.train(was_training)
    return sum(o.choices[0].message.content.strip() == r["solution"] for o, r in zip(outs, rows)) / len(rows)


def _probe(rows, history: list):
    """Stop training once held-out exact match reaches PROBE_BAR (checked every 100 steps from step 300)."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step < 300 or state.global_step % 100:
                return
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            history.append((state.global_step, _exact_match(model, tokenizer, rows)))
            control.should_training_stop = history[-1][1] >= PROBE_BAR

    return Probe()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_vl_learns_shapes_and_deploy_answers_images(tmp_path):
    import openai

    from lmforge import sft_main
    from lmforge.arguments import EvalArguments, TrainArguments, from_dict
    from lmforge.arguments.base import load_config_file
    from lmforge.dataset.shapes import COLOURS, generate_shapes
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine
    from lmforge.pipelines.eval import eval_main
    from lmforge.registry import CALLBACKS

    recipe = load_config_file(str(ROOT / "examples" / "tiny-vl-shapes.yaml"))
    seed = int(os.environ.get("LMFORGE_TEST_SEED", "42"))  # the data order (the built-in weights are fixed)
    history: list = []
    CALLBACKS.register("vl_probe", _probe(generate_shapes("test", n=250)[150:], history), overwrite=True)
    recipe.update(max_steps=CAP_STEPS, output_dir=str(tmp_path / "run"), plot=False, seed=seed, data_seed=seed,
                  callbacks=["vl_probe"])
    result = sft_main(from_dict(TrainArguments, recipe))
    ckpt = result["last_checkpoint"]
    print(f"tiny-vl probes (step, held-out exact match): {history}")
    assert history and history[-1][1] >= PROBE_BAR, f"not learnt within {CAP_STEPS} steps: {history}"
    report = eval_main(EvalArguments(ckpt_dir=ckpt, eval_dataset=["builtin:shapes#150"], max_new_tokens=8,
                                     output_dir=str(tmp_path / "eval"), plot=False))
    data = report["datasets"]["builtin:shapes#150"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / data["predictions"]).read_text().splitlines()]
    colour = [r["response"].strip() == r["reference"] for r in rows if r["reference"] in COLOURS]
    print(f"tiny-vl after {history[-1][0]} steps: {data['metrics']}, colour {sum(colour) / len(colour):.3f}")
    assert data["metrics"]["exact_match"] >= EVAL_BAR, data["metrics"]

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli.main", "deploy", "--ckpt_dir", ckpt, "--port",
                             str(port), "--max_new_tokens", "8"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
                time.sleep(1)
        rows = generate_shapes("test", n=10)
        engine = HfEngine(ckpt_dir=ckpt, device="cpu")
        want = engine.infer([InferRequest(messages=[{"role": "user", "content": r["messages"][0]["content"]}],
                                          images=r["images"]) for r in rows], RequestConfig(max_tokens=8))
        got = []
        for row in rows:
            question = row["messages"][0]["content"].removeprefix("<image>")
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": row["images"][0]}},
                {"type": "text", "text": question}]}])
            got.append(reply.choices[0].message.content)
        right = sum(g.strip() == r["solution"] for g, r in zip(got, rows))
        print(f"deploy: {right}/10 answers right")
        assert got == [w.choices[0].message.content for w in want]  # the served model is the trained one
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lora_on_images_trains_merges_and_serves_the_same_answers(tmp_path):
    """sft --train_type lora (the language model only) -> export --merge_lora -> the merged folder answers
    like base + adapter. About 40 seconds."""
    from lmforge import sft_main
    from lmforge.arguments import TrainArguments
    from lmforge.dataset.shapes import generate_shapes
    from lmforge.export import merge_lora
    from lmforge.infer import InferRequest, RequestConfig
    from lmforge.infer.hf import HfEngine

    result = sft_main(TrainArguments(model="builtin:tiny-vl", dataset=["builtin:shapes#32"], train_type="lora",
                                     lora_rank=4, max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                                     max_pixels=56 * 56, output_dir=str(tmp_path / "run"), report_to=["none"],
                                     plot=False, add_version=False))
    ckpt = result["last_checkpoint"]
    merged = merge_lora(ckpt_dir=ckpt, output_dir=str(tmp_path / "merged"))
    rows = generate_shapes("test", n=4)
    reqs = [InferRequest(messages=[{"role": "user", "content": r["messages"][0]["content"]}], images=r["images"])
            for r in rows]
    cfg = RequestConfig(max_tokens=4, ignore_eos=True)
    adapter = [r.choices[0].token_ids for r in HfEngine(ckpt_dir=ckpt, device="cpu").infer(reqs, cfg)]
    whole = HfEngine(merged, device="cpu")
    assert whole.processor.image_processor.size.longest_edge == 56 * 56  # --max_pixels travels with the model
    assert [r.choices[0].token_ids for r in whole.infer(reqs, cfg)] == adapter
