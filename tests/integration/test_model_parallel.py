"""Model parallelism on real processes (gloo on CPU): tensor, pipeline (GPipe, 1F1B), the
hybrids on a 2-D mesh, and the memory techniques, checked by distml verify against one
process; checkpoints and artifacts of model-parallel runs used by one process."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from distml.artifact import load_artifact
from tests.helpers.cli import ROOT
from tests.helpers.configs import small_lm_config, write_config
from tests.helpers.distributed import resume_with_no_more_steps, verify


def _passed(report, names, tolerance=1e-4):
    assert [r["strategy"] for r in report["results"]] == names
    for r in report["results"]:
        assert r["passed"], r
        assert r["max_rel_loss_diff"] < tolerance
        assert r["max_rel_param_diff"] < tolerance


def test_tensor_and_pipeline_match_one_process_on_the_transformer(tmp_path, tiny_raw):
    # Activation checkpointing on: it must not change a number (the reference has it off).
    # The transformer's head shares the embedding's weight across the two pipeline ranks;
    # interleaved puts 2 of its 4 layers' stages on each rank.
    names = ["ddp", "tensor", "pipeline-gpipe", "pipeline-1f1b", "pipeline-interleaved"]
    _, report = verify(tmp_path, small_lm_config(tmp_path, tiny_raw),
                        "--strategies", ",".join(names),
                        "--set", "train.activation_checkpointing=true")
    _passed(report, names)
    state = {r["strategy"]: r["state_bytes_per_rank"] for r in report["results"]}
    for split in ("tensor", "pipeline-1f1b"):  # each rank holds part of the model
        assert max(b["params"] for b in state[split]) < 0.8 * state["ddp"][0]["params"]


def test_tensor_and_pipeline_match_one_process_on_the_digits_mlp(tmp_path):
    # Stages balanced by measured forward time here (GPipe's heuristic), by parameters above;
    # activation checkpointing on; a third hidden layer gives interleaving its 4 stages.
    names = ["tensor", "pipeline-gpipe", "pipeline-1f1b", "pipeline-interleaved"]
    _, report = verify(tmp_path, ROOT / "examples" / "digits.yaml", "--candidate", "mlp-wide",
                        "--strategies", ",".join(names),
                        "--set", "train.candidates.1.model.hidden_sizes=[256, 256, 256]",
                        "--set", "train.activation_checkpointing=true",
                        "--set", "train.parallel.pipeline.stage_split=time",
                        "--set", f"output_dir={tmp_path / 'runs'}")
    _passed(report, names)


def test_hybrids_on_a_2d_mesh_match_one_process(tmp_path):
    # (the transformer: on the 3-D mesh, test_3d_matches_one_process_...)
    names = ["data-x-tensor", "data-x-pipeline"]
    _, report = verify(tmp_path, ROOT / "examples" / "digits.yaml", "--candidate", "mlp-wide",
                        "--set", f"output_dir={tmp_path / 'runs'}",
                        "--set", "train.parallel.pipeline.stage_split=[2, 1]",  # given stages
                        "--strategies", ",".join(names), "--world-size", "4")
    assert report["world_size"] == 4
    _passed(report, names)


def test_bf16_matches_one_process_in_bf16_within_its_tolerance(tmp_path, tiny_raw):
    # bf16 keeps 8 significant bits (unit roundoff 2**-8 = 0.4%); splitting the batch over
    # ranks changes which sums are rounded, so results differ by a few units of roundoff
    # compounded over 20 steps, not by 1e-4: the tolerance is 2e-2, five units.
    names = ["ddp", "pipeline-1f1b"]
    _, report = verify(tmp_path, small_lm_config(tmp_path, tiny_raw),
                        "--strategies", ",".join(names), "--set", "train.precision=bf16")
    assert report["tolerance"] == 2e-2
    _passed(report, names, tolerance=2e-2)
    assert max(r["max_rel_param_diff"] for r in report["results"]) > 1e-6  # bf16 was on


@pytest.mark.parametrize("strategy", ["tensor", "pipeline"])
def test_a_model_parallel_run_exports_a_normal_model_and_resumes_on_one_process(
        tmp_path, tiny_raw, strategy):
    # max_steps ends both runs at the same step: a pipeline drops an epoch's short last batch
    # (its stages exchange fixed shapes) where one process trains on it.
    tiny_raw["train"].update(parallel={"strategy": strategy, "world_size": 2}, epochs=2,
                             max_steps=30, checkpoint_every_steps=10, restore_best=False)
    tiny_raw["train"]["candidates"] = tiny_raw["train"]["candidates"][:1]
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    # It resumes, exactly, as one process (no step left: the weights must be the same).
    result = resume_with_no_more_steps(tmp_path, cfg, "{strategy: single, world_size: 1}",
                                       "small")
    assert result["strategy"] == "single"
    (out,) = (tmp_path / "runs" / "tiny").glob("2*/candidates/small")
    artifact = load_artifact(out / "artifact")  # the whole model, in one process
    assert load_file(out / "artifact" / "model.safetensors").keys() == {
        "0.weight", "0.bias", "2.weight", "2.bias"}
    x = artifact.preprocess(json.loads(json.dumps([[0.0] * 64])))
    assert artifact.model(x).shape == (1, 10)


def test_a_one_process_checkpoint_resumes_as_a_pipeline_with_tied_weights(tmp_path, tiny_raw):
    # The head's weight is the embedding's: the last stage calls it 'head.weight', one
    # process 'tok_emb.weight'; the optimizer state must be found under either.
    tiny_raw["train"].update(epochs=1, restore_best=False)
    cfg = small_lm_config(tmp_path, tiny_raw)
    result = resume_with_no_more_steps(tmp_path, cfg, "{strategy: pipeline, world_size: 2}",
                                       "gpt")
    assert result["strategy"] == "pipeline"


def test_3d_matches_one_process_and_its_checkpoint_reshards_into_ddp_and_back(
        tmp_path, tiny_raw):
    # 2 x 2 x 2 on 8 processes: each of 2 replicas is 2 pipeline stages (interleaved: 2 of
    # the 4 layers' stages per rank, the tied head and embedding on different ranks) whose
    # blocks are split over 2 tensor ranks. Clipping is on and active (the norm counts each
    # piece once: replicas, and tensor ranks holding the same whole tensor), activation
    # checkpointing too. The trained state goes through a DCP checkpoint into ddp on the
    # same 8 processes and back into 3d: parameters and optimizer state come back.
    _, report = verify(tmp_path, small_lm_config(tmp_path, tiny_raw), "--strategies", "3d",
                        "--world-size", "8", "--steps", "6", "--reshard", "ddp",
                        "--set", "train.grad_clip=0.05",
                        "--set", "train.activation_checkpointing=true",
                        "--set", "train.parallel.pipeline.schedule=interleaved-1f1b")
    _passed(report, ["3d"])
    (result,) = report["results"]
    assert result["reshard"]["through"] == "ddp"
    assert result["reshard"]["max_rel_param_diff"] < 1e-4
    assert result["reshard"]["max_rel_optim_diff"] < 1e-4
    # Each rank holds one stage's share of its blocks, under half of the whole model.
    (whole,) = (tmp_path / "runs").glob("tiny/2*/verify/3d.safetensors")
    full = sum(t.numel() * t.element_size() for t in load_file(whole).values())
    assert max(b["params"] for b in result["state_bytes_per_rank"]) < 0.5 * full
