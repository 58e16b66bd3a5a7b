"""Framework integrations on tiny models built from configs (no download): the Hugging Face
Trainer (causal LM and sequence classification), PyTorch Lightning (one process, and one
replica of 2 processes under its DDP strategy) and Accelerate.

Two replicas train one after the other through one exchange directory: replica 1 first, which
publishes every K steps (and has no teacher yet), then replica 0, which loads replica 1's
newest version at its first exchange after burn-in and distils from it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from numerics import U32, soft_target_tolerance, softmax_error

from codistill import AlphaSchedule, Codistiller, DirectoryExchange, MemoryExchange

STEPS, K, BURN_IN = 12, 4, 4  # replica 0 loads replica 1's step 12 at its step 4
VOCAB = 256


@pytest.fixture
def replica_env(monkeypatch, tmp_path):
    """``use(r)`` sets the environment ``codistill launch`` gives replica r of 2."""
    exchange = str(tmp_path / "exchange")

    def use(replica: int) -> str:
        monkeypatch.setenv("CODISTILL_REPLICA", str(replica))
        monkeypatch.setenv("CODISTILL_NUM_REPLICAS", "2")
        monkeypatch.setenv("CODISTILL_EXCHANGE", exchange)
        torch.manual_seed(replica)
        return exchange

    return use


def counting_tokens(n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences that count up by one from a random start: quick to learn."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(length)) % VOCAB


# -- Hugging Face Trainer ----------------------------------------------------------------

def _causal_config(kind: str):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **small)
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=32, **small)


def _training_args(out, **kw):
    transformers = pytest.importorskip("transformers")
    settings = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=3e-3,
                    logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                    dataloader_pin_memory=False)
    return transformers.TrainingArguments(**{**settings, **kw})


def _train_hf(make_model, data, tmp_path, replica: int, **args):
    from codistill.integrations.hf import CodistillTrainer

    model = make_model()
    settings = {"exchange_every": K, "alpha": AlphaSchedule(burn_in=BURN_IN)}
    trainer = CodistillTrainer(model=model, args=_training_args(tmp_path / f"out-{replica}", **args),
                               train_dataset=data, codistiller=settings)
    trainer.train()  # closes the Codistiller at the end
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logged


def _assert_codistilled(exchange: str, first, second) -> None:
    """Replica 1 (``first``) published every K steps and distilled from nothing; replica 0
    (``second``) loaded replica 1's last version and its ψ is on after burn-in."""
    (t1, log1), (t0, log0) = first, second
    assert DirectoryExchange(exchange).versions(1) == list(range(K, STEPS + 1, K))
    assert t1.codistiller.step == STEPS and t1.codistiller.teacher_versions() == {0: None}
    assert all(h["distill_loss"] == 0 for h in log1)
    assert t0.codistiller.teacher_versions() == {1: STEPS}
    psi = {h["step"]: h["distill_loss"] for h in log0}
    assert all((v > 0) == (s > BURN_IN) for s, v in psi.items()), psi  # logged at steps 2, 4, ...
    for log in (log1, log0):
        losses = [h["loss"] for h in log]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_trainer_causal_lm_with_gradient_accumulation(tmp_path, replica_env, kind):
    transformers = pytest.importorskip("transformers")
    tokens = [counting_tokens(64, 16, seed) for seed in (0, 1)]

    def make_model():
        return transformers.AutoModelForCausalLM.from_config(_causal_config(kind))

    runs = {}
    for r in (1, 0):  # 2 micro-batches of 4 per optimizer step: K and B count optimizer steps
        exchange = replica_env(r)
        data = [{"input_ids": x, "labels": x} for x in tokens[r]]
        runs[r] = _train_hf(make_model, data, tmp_path, r, gradient_accumulation_steps=2,
                            per_device_train_batch_size=4)
    assert runs[0][0].shift_labels
    _assert_codistilled(exchange, runs[1], runs[0])


def test_hf_trainer_sequence_classification(tmp_path, replica_env):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3)
    runs = {}
    for r in (1, 0):
        exchange = replica_env(r)
        g = torch.Generator().manual_seed(r)
        y = torch.randint(0, 3, (96,), generator=g)  # class c: tokens 80c .. 80c+3
        x = 80 * y[:, None] + torch.randint(0, 4, (96, 8), generator=g)
        data = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": c} for s, c in zip(x, y)]
        runs[r] = _train_hf(lambda: transformers.AutoModelForSequenceClassification.from_config(config),
                            data, tmp_path, r)
    assert not runs[0][0].shift_labels
    _assert_codistilled(exchange, runs[1], runs[0])


def test_hf_distill_loss_counts_only_labelled_tokens(tmp_path):
    """ψ of a padded batch is the mean KL over the positions the causal LM loss counts."""
    transformers = pytest.importorskip("transformers")
    from codistill.integrations.hf import CodistillTrainer

    exchange = MemoryExchange()
    config = _causal_config("gpt2")
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # train mode, same numbers
    torch.manual_seed(0)  # the same two models whatever ran before (the checks below need a margin)
    models = [transformers.AutoModelForCausalLM.from_config(config) for _ in range(2)]
    peer = Codistiller(models[1], exchange, replica=1, num_replicas=2)
    peer.publish(1)
    trainer = CodistillTrainer(model=models[0], args=_training_args(tmp_path),
                               codistiller=Codistiller(models[0], exchange, replica=0, num_replicas=2))
    trainer.codistiller.refresh()
    ids = counting_tokens(2, 8, 0)
    labels = ids.clone()
    labels[1, 5:] = -100  # the second sequence is 5 tokens and 3 of padding
    inputs = {"input_ids": ids, "attention_mask": (labels != -100).long(), "labels": labels}
    models[0].train()
    with torch.no_grad():
        loss = trainer.compute_loss(models[0], dict(inputs))
        task = models[0](**inputs).loss
        s = models[0](input_ids=ids, attention_mask=inputs["attention_mask"]).logits
        t = models[1](input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    # float64 KL from the same fp32 logits. loss = task + ψ rounds once (u·|loss|) and loss − task
    # is exact (Sterbenz: within a factor 2); ψ is within soft_target_tolerance, its teacher's
    # fp32 softmax within softmax_error.
    student, teacher = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # [2, 8]
    counted = torch.cat([kl[0, :7], kl[1, :4]])  # position t predicts token t+1 (a label there)
    rows = (torch.cat([s[0, :7], s[1, :4]]), torch.cat([t[0, :7], t[1, :4]]))
    tol = 2 * U32 * abs(float(loss)) + soft_target_tolerance(rows[0], torch.softmax(rows[1].double(), -1),
                                                               p_error=softmax_error(rows[1]))
    assert abs(float(loss - task) - float(counted.mean())) <= tol
    # ψ is within tol of the mean over the counted positions, which differs from the mean over
    # all positions by more than 2·tol: the padded positions do not count.
    assert abs(float(counted.mean()) - float(kl.mean())) > 2 * tol
    models[0].eval()  # evaluation: the task loss alone
    with torch.no_grad():
        assert float(trainer.compute_loss(models[0], dict(inputs))) == pytest.approx(float(task), rel=1e-5)


# -- PyTorch Lightning -------------------------------------------------------------------

def _lightning_module():
    L = pytest.importorskip("lightning.pytorch")
    from codistill.integrations.lightning import distill_loss

    class TinyLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB))
            self.losses: list[float] = []
            self.psi: dict[int, float] = {}

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            (seq,) = batch
            x, y = seq[:, :-1], seq[:, 1:]
            logits = self(x)
            psi = distill_loss(self, x, logits)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
            self.losses.append(loss.item())
            self.psi[self.global_step] = psi.item()
            return loss + psi

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return L, TinyLM


def _fit(L, module, callbacks, data, max_steps: int = STEPS, ckpt_path: str | None = None, **kw):
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **kw)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch")
def test_lightning_callback_codistills_and_resumes(tmp_path, replica_env):
    L, TinyLM = _lightning_module()
    from codistill.integrations.lightning import CodistillCallback

    runs = {}
    for r in (1, 0):  # accumulate 2 batches per optimizer step: K and B count optimizer steps
        exchange = replica_env(r)
        data = torch.utils.data.TensorDataset(counting_tokens(256, 17, r))
        callback, module = CodistillCallback(exchange_every=K, alpha=AlphaSchedule(burn_in=BURN_IN)), TinyLM()
        trainer = _fit(L, module, [callback], data, accumulate_grad_batches=2)
        runs[r] = trainer, callback, module
    assert DirectoryExchange(exchange).versions(1) == list(range(K, STEPS + 1, K))
    _, first, m1 = runs[1]
    trainer, second, m0 = runs[0]
    assert first.codistiller.step == STEPS and first.codistiller.teacher_versions() == {0: None}
    assert second.codistiller.teacher_versions() == {1: STEPS}
    assert all(v == 0 for v in m1.psi.values())
    assert all((v > 0) == (s >= BURN_IN) for s, v in m0.psi.items()), m0.psi
    for m in (m0, m1):
        assert all(math.isfinite(v) for v in m.losses) and m.losses[-1] < m.losses[0]

    # the teachers travel in Lightning's checkpoint: a resumed fit distils at once
    ckpt = str(tmp_path / "replica0.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed, module = CodistillCallback(exchange_every=K, alpha=AlphaSchedule(burn_in=BURN_IN)), TinyLM()
    _fit(L, module, [resumed], data, max_steps=STEPS + 1, ckpt_path=ckpt)
    assert resumed.codistiller.teacher_versions() == {1: STEPS}
    assert module.psi[STEPS] > 0  # step 12 is no exchange: the teacher came from the checkpoint


def test_lightning_distill_loss_needs_the_callback(tmp_path):
    L, TinyLM = _lightning_module()
    data = torch.utils.data.TensorDataset(counting_tokens(16, 9, 0))
    with pytest.raises(RuntimeError, match="no CodistillCallback"):
        _fit(L, TinyLM(), [], data, max_steps=1)


@pytest.mark.slow
def test_lightning_ddp_strategy_is_one_replica(tmp_path):
    """Replica 0 as 2 CPU processes under Lightning's DDP strategy (its own launcher, gloo):
    the first rank alone publishes, both ranks load the peer's version and distil from
    identical teachers."""
    pytest.importorskip("lightning")
    exchange, out = str(tmp_path / "exchange"), str(tmp_path / "out")
    g = torch.Generator().manual_seed(5)
    peer = {"net.0.weight": torch.randn(64, 16, generator=g),  # tests/lightning_ddp_probe.py's TinyLM
            "net.1.weight": torch.randn(64, 16, generator=g), "net.1.bias": torch.randn(64, generator=g)}
    DirectoryExchange(exchange).publish(1, 3, peer, {"replica": 1, "model": None})
    env = {**os.environ, "CODISTILL_REPLICA": "0", "CODISTILL_NUM_REPLICAS": "2",
           "CODISTILL_EXCHANGE": exchange, "OMP_NUM_THREADS": "1"}
    probe = os.path.join(os.path.dirname(__file__), "lightning_ddp_probe.py")
    job = subprocess.run([sys.executable, probe, out], env=env, capture_output=True, text=True, timeout=240)
    assert job.returncode == 0, job.stderr[-3000:]
    ranks = [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [9, 9]
    assert [r["versions"] for r in ranks] == [{"1": 3}, {"1": 3}]
    assert ranks[0]["teacher_sum"] == ranks[1]["teacher_sum"]
    assert ranks[0]["bytes_published"] > 0 and ranks[1]["bytes_published"] == 0
    assert DirectoryExchange(exchange).versions(0) == [3, 6, 9]
    for r in ranks:  # burn-in 3: ψ is 0 for steps 0-2, then on (teacher loaded at step 3)
        assert r["psi"][:3] == [0, 0, 0] and all(v > 0 for v in r["psi"][3:])


# -- Accelerate --------------------------------------------------------------------------

@pytest.fixture
def fresh_accelerate():
    """``reset()`` resets Accelerate's process-wide state (the Trainer sets it too); reset
    again at the end."""
    accelerate = pytest.importorskip("accelerate")

    def reset():
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
        return accelerate

    yield reset
    reset()


def test_accelerate_prepare(tmp_path, replica_env, fresh_accelerate):
    runs = {}
    for r in (1, 0):  # 2 batches per optimizer step: K and B count optimizer steps
        exchange = replica_env(r)
        accelerate = fresh_accelerate()
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 32), torch.nn.Linear(32, VOCAB))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        loader = torch.utils.data.DataLoader(counting_tokens(2 * 2 * 4 * STEPS, 9, r), batch_size=4)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        cd = Codistiller.from_env(accelerator.unwrap_model(model), exchange_every=K,
                                  alpha=AlphaSchedule(burn_in=BURN_IN))
        losses, psi = [], {}
        for seq in loader:
            x, y = seq[:, :-1], seq[:, 1:]
            with accelerator.accumulate(model):
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
                psi[cd.step] = (d := cd.distill_loss(x, logits)).item()
                accelerator.backward(loss + d)
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
            if accelerator.sync_gradients:
                cd.after_step()
            if cd.step == STEPS:
                break
        cd.close()
        runs[r] = cd, losses, psi
    assert DirectoryExchange(exchange).versions(1) == list(range(K, STEPS + 1, K))
    (cd1, losses1, psi1), (cd0, losses0, psi0) = runs[1], runs[0]
    assert cd1.teacher_versions() == {0: None} and cd0.teacher_versions() == {1: STEPS}
    assert all(v == 0 for v in psi1.values())
    assert sorted(psi0) == list(range(STEPS)) and all((v > 0) == (s >= BURN_IN) for s, v in psi0.items())
    for losses in (losses0, losses1):
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


# -- packaging -----------------------------------------------------------------------------

@pytest.mark.parametrize("module, extra", [("hf", "hf"), ("lightning", "lightning")])
def test_a_missing_framework_names_its_extra(monkeypatch, module, extra):
    from codistill._extras import MissingExtra

    blocked = {"hf": "transformers", "lightning": "lightning"}[module]
    for name in list(sys.modules):
        if name.split(".")[0] == blocked or name == f"codistill.integrations.{module}":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # import fails as if not installed
    with pytest.raises(MissingExtra, match=rf"pip install 'codistill\[{extra}\]'"):
        __import__(f"codistill.integrations.{module}")


# -- per-replica outputs ---------------------------------------------------------------------

def test_hf_trainer_writes_into_a_directory_of_its_replica(tmp_path, replica_env):
    transformers = pytest.importorskip("transformers")
    from codistill.integrations.hf import CodistillTrainer

    replica_env(1)
    model = transformers.GPT2LMHeadModel(_causal_config("gpt2"))
    data = [{"input_ids": s, "labels": s} for s in counting_tokens(8, 16, 0)]
    trainer = CodistillTrainer(model=model, args=_training_args(tmp_path / "out"), train_dataset=data)
    assert trainer.args.output_dir == str(tmp_path / "out" / "replica-1")
    trainer.save_model()
    assert (tmp_path / "out" / "replica-1" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["replica-1"]
    named = CodistillTrainer(model=model, args=_training_args(tmp_path / "run-replica-1"), train_dataset=data)
    assert named.args.output_dir == str(tmp_path / "run-replica-1")  # named by `{replica}` already
    trainer.codistiller.close()
    named.codistiller.close()


def test_lightning_replicas_started_alike_get_their_own_logs_and_checkpoints(tmp_path, replica_env):
    L, TinyLM = _lightning_module()
    from lightning.pytorch.callbacks import ModelCheckpoint

    from codistill.integrations.lightning import CodistillCallback

    for r in (1, 0):  # the same arguments for both, as `codistill launch` runs them
        replica_env(r)
        data = torch.utils.data.TensorDataset(counting_tokens(64, 9, r))
        trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, default_root_dir=str(tmp_path),
                            callbacks=[CodistillCallback(exchange_every=2),
                                       ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="last")],
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(TinyLM(), torch.utils.data.DataLoader(data, batch_size=8))
        assert trainer.logger.log_dir == str(tmp_path / "lightning_logs" / f"version_0-replica-{r}")
    logs = tmp_path / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0-replica-0", "version_0-replica-1"]
    for r in (0, 1):
        files = [p.name for p in (logs / f"version_0-replica-{r}").iterdir()]
        assert "hparams.yaml" in files and len([f for f in files if "tfevents" in f]) == 1
        assert (tmp_path / "ckpt" / f"replica-{r}" / "last.ckpt").is_file()


@pytest.mark.slow
def test_lightning_cli_replicas_launched_alike_overwrite_nothing(tmp_path):
    """examples/lightning_cli.py, 2 replicas through `codistill launch` with identical
    arguments: each its own logs, config and checkpoint; both exchange versions."""
    pytest.importorskip("jsonargparse")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    job = subprocess.run(
        [sys.executable, "-m", "codistill", "launch", "--replicas", "2", "--exchange", str(tmp_path / "ex"),
         "--", sys.executable, os.path.join(root, "examples", "lightning_cli.py"), "fit",
         "--trainer.max_steps", "20", "--data.chars", "60000",
         "--trainer.callbacks+=codistill.integrations.lightning.CodistillCallback",
         "--trainer.callbacks.exchange_every=5", "--trainer.callbacks.burn_in=5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    logs = tmp_path / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0-replica-0", "version_0-replica-1"]
    for r in (0, 1):
        run = logs / f"version_0-replica-{r}"
        assert (run / "config.yaml").is_file() and (run / "hparams.yaml").is_file()
        (ckpt,) = (run / "checkpoints").iterdir()
        assert ckpt.name.endswith("step=20.ckpt")
        assert DirectoryExchange(str(tmp_path / "ex")).versions(r)[-1] == 20  # older ones pruned
        state = torch.load(ckpt, weights_only=False)
        (codistill_state,) = [v for k, v in state["callbacks"].items() if "CodistillCallback" in k]
        versions = {p: t["version"] for p, t in codistill_state["codistiller"]["teachers"].items()}
        assert versions.get(1 - r) is not None, versions  # a teacher was loaded from the peer


@pytest.mark.slow
def test_hf_trainer_example_replicas_launched_alike_save_apart(tmp_path):
    """examples/hf_trainer.py, 2 replicas through `codistill launch`, a bare `python` and no
    per-replica argument: each saves its own model under runs/hf-trainer/replica-R."""
    pytest.importorskip("transformers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    job = subprocess.run(
        [sys.executable, "-m", "codistill", "launch", "--replicas", "2", "--exchange", str(tmp_path / "ex"),
         "--", "python", os.path.join(root, "examples", "hf_trainer.py"), "--steps", "60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    out = tmp_path / "runs" / "hf-trainer"
    assert sorted(p.name for p in out.iterdir()) == ["replica-0", "replica-1"]
    weights = []
    for r in (0, 1):
        assert (out / f"replica-{r}" / "config.json").is_file()
        (w,) = (out / f"replica-{r}").glob("model.safetensors")
        weights.append(w.read_bytes())
        assert DirectoryExchange(str(tmp_path / "ex")).versions(r)[-1] == 50  # after burn-in
    assert weights[0] != weights[1]  # two models, not one saved twice
