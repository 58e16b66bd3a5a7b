"""Teachers: averaging over the peers, staleness, in-place refresh, burn-in, architectures."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from exchanges import newest
from numerics import kl_tolerance

from codistill.codistiller import BoundedDrift, Codistiller, DistillLoss, LockStep, TeacherSpec
from codistill.exchange import DirectoryExchange, MemoryExchange, state_nbytes
from codistill.losses import AlphaSchedule, distill_loss
from codistill.models import LSTMLM, TransformerLM
from codistill.teachers import Teacher, average_predictions


def _replicas(make_lm, n, exchange, **kw):
    models = [make_lm(100 + r) for r in range(n)]
    cds = [Codistiller(m, exchange, replica=r, num_replicas=n, **kw) for r, m in enumerate(models)]
    return models, cds


def _step_all(cds, step):
    """What the engine does after a step: every due replica publishes, then every one refreshes."""
    due = [cd for cd in cds if cd.exchange_due(step)]
    for cd in due:
        cd.publish(step)
    for cd in due:
        cd.refresh(step)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_average_over_the_other_replicas_for_n3(make_lm, tokens, temperature):
    ex = MemoryExchange()
    models, cds = _replicas(make_lm, 3, ex, exchange_every=5, loss=DistillLoss(temperature=temperature))
    cds[1].publish(5)
    cds[2].publish(5)
    assert cds[0].refresh() == {1: 5, 2: 5}
    assert cds[0].peers == [1, 2] and sorted(cds[0].teachers) == [1, 2]

    with torch.no_grad():
        p1 = torch.softmax(models[1](tokens) / temperature, -1)
        p2 = torch.softmax(models[2](tokens) / temperature, -1)
    want = (p1 + p2) / 2
    got = average_predictions(list(cds[0].teachers.values()), tokens, "kl", temperature)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, p1, atol=1e-4)  # both peers count, not just one

    logits = models[0](tokens)
    loss = cds[0].distill_loss(tokens, logits, 5)
    # The reference: float64 from the same fp32 inputs; the fp32 KL is within kl_tolerance.
    logq = torch.log_softmax(logits.detach().double() / temperature, -1).reshape(-1, logits.shape[-1])
    p = got.double().reshape(-1, got.shape[-1])
    by_hand = F.kl_div(logq, p, reduction="batchmean") * temperature**2
    assert abs(float(loss.detach()) - float(by_hand)) <= kl_tolerance(p, logq, temperature)


def test_only_loaded_teachers_are_averaged(make_lm, tokens):
    ex = MemoryExchange()
    models, cds = _replicas(make_lm, 3, ex, exchange_every=5)
    cds[2].publish(5)  # replica 1 has published nothing yet
    assert cds[0].refresh() == {1: None, 2: 5}
    with torch.no_grad():
        want = torch.softmax(models[2](tokens), -1)
    torch.testing.assert_close(average_predictions(list(cds[0].teachers.values()), tokens, "kl"), want)
    never_loaded = Teacher(1, make_lm(7))
    torch.testing.assert_close(average_predictions([never_loaded, cds[0].teachers[2]], tokens, "kl"), want)


def test_average_predictions_without_loaded_teacher_raises(make_lm, tokens):
    with pytest.raises(RuntimeError, match="no teacher"):
        average_predictions([Teacher(1, make_lm(0))], tokens, "kl")


def test_staleness_is_tracked(make_lm):
    ex = MemoryExchange()
    _, cds = _replicas(make_lm, 3, ex, exchange_every=5)
    assert cds[0].staleness(3) == {1: None, 2: None}
    _step_all(cds, 5)
    assert cds[0].staleness(5) == {1: 0, 2: 0}
    assert cds[0].staleness(9) == {1: 4, 2: 4}
    assert cds[2].staleness(7) == {0: 2, 1: 2}
    _step_all(cds, 7)  # not an exchange step: nothing moves
    assert cds[0].staleness(9) == {1: 4, 2: 4}
    _step_all(cds, 10)
    assert cds[0].staleness(12) == {1: 2, 2: 2}
    assert {t.version for t in cds[0].teachers.values()} == {10}


def test_staleness_when_a_peer_publishes_late(make_lm):
    """A replica refreshing before its peer publishes keeps the older teacher: staleness K + d."""
    ex = MemoryExchange()
    _, cds = _replicas(make_lm, 2, ex, exchange_every=5)
    _step_all(cds, 5)
    cds[0].after_step(10)  # replica 1 has not reached step 10 yet
    assert cds[0].staleness(12) == {1: 7}
    cds[1].after_step(10)
    assert cds[0].refresh() == {1: 10}
    assert cds[0].staleness(12) == {1: 2}


def test_refresh_loads_into_the_same_module_object(make_lm, tokens):
    ex = MemoryExchange()
    models, cds = _replicas(make_lm, 2, ex, exchange_every=5)
    _step_all(cds, 5)
    teacher = cds[0].teachers[1]
    module = teacher.module
    ptrs = {n: p.data_ptr() for n, p in module.named_parameters()}
    old = {k: v.clone() for k, v in module.state_dict().items()}

    # Replica 1 trains a step; its next published version must land in the same tensors.
    opt = torch.optim.SGD(models[1].parameters(), lr=0.5)
    F.cross_entropy(models[1](tokens).reshape(-1, 20), tokens.reshape(-1)).backward()
    opt.step()
    _step_all(cds, 10)

    assert cds[0].teachers[1] is teacher and teacher.module is module
    assert teacher.version == 10
    assert {n: p.data_ptr() for n, p in module.named_parameters()} == ptrs
    new = module.state_dict()
    assert any(not torch.equal(new[k], old[k]) for k in old)
    for k, v in models[1].state_dict().items():
        assert torch.equal(new[k], v), k
    assert all(not p.requires_grad for p in module.parameters())
    # The loaded copy is a snapshot: further training of the peer does not leak into it.
    with torch.no_grad():
        models[1].head.weight.add_(1.0)
    assert not torch.equal(module.head.weight, models[1].head.weight)


def test_refresh_to_a_given_version_and_byte_accounting(make_lm):
    ex = MemoryExchange(keep=3)
    models, cds = _replicas(make_lm, 2, ex, exchange_every=5)
    cds[1].publish(5)
    with torch.no_grad():
        models[1].head.bias.fill_(3.0)
    cds[1].publish(10)
    # Lock-step mode (LockStep) loads exactly the version of the given step.
    lock = Codistiller(models[0], ex, replica=0, num_replicas=2, exchange_every=5, wait=LockStep(1.0))
    assert lock.refresh(5) == {1: 5}
    assert float(lock.teachers[1].module.head.bias.abs().max()) != 3.0
    assert lock.refresh(10) == {1: 10}
    assert torch.all(lock.teachers[1].module.head.bias == 3.0)
    assert lock.refresh(5) == {1: 5} and float(lock.teachers[1].module.head.bias.abs().max()) != 3.0
    with pytest.raises(TimeoutError, match="replicas \\[1\\] did not publish step 15"):
        Codistiller(models[0], ex, replica=0, num_replicas=2, exchange_every=5,
                    wait=LockStep(0.05)).refresh(15)
    assert lock.stats().sync_wait_s < 0.2  # every version it asked for was there: it did not wait
    # Otherwise a refresh loads the newest version.
    assert cds[0].refresh() == {1: 10}
    assert torch.all(cds[0].teachers[1].module.head.bias == 3.0)
    nbytes = state_nbytes(models[1].state_dict())
    assert cds[1].stats().bytes_published == 2 * nbytes
    assert lock.stats().bytes_read == 3 * nbytes
    assert cds[0].stats().bytes_read == nbytes
    assert cds[0].refresh() == {1: 10}  # nothing new: nothing read
    assert cds[0].stats().bytes_read == nbytes
    assert lock.refresh(5) == {1: 5}  # the version already loaded: nothing read
    assert lock.stats().bytes_read == 3 * nbytes
    # A lock-step refresh that waits for its peer's version counts the wait.
    waited = lock.stats().sync_wait_s
    later = threading.Timer(0.2, cds[1].publish, args=(15,))
    later.start()
    assert lock.refresh(15) == {1: 15}
    later.join()
    assert 0.2 <= lock.stats().sync_wait_s - waited < 1.0


def test_exchange_and_distillation_only_after_burn_in(make_lm, tokens):
    ex = MemoryExchange()
    models, cds = _replicas(make_lm, 2, ex, exchange_every=5, alpha=AlphaSchedule(burn_in=12))
    due = [s for s in range(31) if cds[0].exchange_due(s)]
    # Step 10 is the last exchange before B=12: its teachers serve steps 12..14.
    assert due == [10, 15, 20, 25, 30]
    _step_all(cds, 5)
    assert ex.versions(0) == [] and ex.versions(1) == [] and cds[0].teachers == {}
    assert float(cds[0].distill_loss(tokens, models[0](tokens), 5).detach()) == 0.0
    _step_all(cds, 10)
    assert ex.versions(1) == [10] and cds[0].teachers[1].version == 10
    assert float(cds[0].distill_loss(tokens, models[0](tokens), 11).detach()) == 0.0
    assert float(cds[0].distill_loss(tokens, models[0](tokens), 12).detach()) > 0.0


def test_no_exchange_without_distillation(make_lm):
    ex = MemoryExchange()
    _, off = _replicas(make_lm, 2, ex, exchange_every=5, alpha=0.0)
    assert not any(off[0].exchange_due(s) for s in range(100))
    alone = Codistiller(make_lm(0), ex, replica=0, num_replicas=1, exchange_every=5)
    assert alone.peers == [] and not any(alone.exchange_due(s) for s in range(100))
    _step_all([alone], 5)
    assert ex.versions(0) == []


def test_teacher_built_from_the_peer_model_spec(make_lm, lstm_spec, transformer_spec, tokens):
    ex = MemoryExchange()
    student, peer = make_lm(0, lstm_spec), make_lm(1, transformer_spec)
    cd = Codistiller(student, ex, replica=0, num_replicas=2, exchange_every=5, model_spec=lstm_spec)
    Codistiller(peer, ex, replica=1, num_replicas=2, exchange_every=5,
                model_spec=transformer_spec).publish(5)
    assert cd.refresh() == {1: 5}
    teacher = cd.teachers[1].module
    assert isinstance(student, LSTMLM) and isinstance(teacher, TransformerLM)
    for k, v in peer.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
    with torch.no_grad():
        want = torch.softmax(peer(tokens), -1)
    torch.testing.assert_close(average_predictions([cd.teachers[1]], tokens, "kl"), want)
    logits = student(tokens)
    loss = cd.distill_loss(tokens, logits, 5)
    torch.testing.assert_close(loss.detach(), distill_loss(logits.detach(), want))
    loss.backward()
    assert float(student.head.weight.grad.abs().sum()) > 0


def test_teacher_without_spec_copies_the_student_architecture(make_lm, tokens):
    ex = MemoryExchange()
    models, cds = _replicas(make_lm, 2, ex, exchange_every=5)
    _step_all(cds, 5)
    teacher = cds[0].teachers[1].module
    assert type(teacher) is type(models[0]) and teacher is not models[0]
    for k, v in models[1].state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k


def test_teacher_rejects_weights_that_do_not_fit(make_lm, lstm_spec, transformer_spec, tmp_path):
    ex = DirectoryExchange(str(tmp_path))
    peer = make_lm(1, transformer_spec)
    ex.publish(1, 5, peer.state_dict(), {"replica": 1})
    teacher = Teacher(1, make_lm(0, lstm_spec))
    with pytest.raises(ValueError, match="replica 1 at step 5"):
        teacher.load(newest(ex, 1))
    assert teacher.version is None


def test_state_dict_restores_teachers_exactly(make_lm, lstm_spec, transformer_spec, tokens):
    """A Codistiller restored from state_dict() into a fresh model copy and a fresh (empty)
    exchange distils exactly as the original: same teachers, versions, meta and counters."""
    import copy

    ex = MemoryExchange()
    student = make_lm(0, lstm_spec)
    peers = {1: make_lm(1, lstm_spec), 2: make_lm(2, transformer_spec)}
    specs = {1: lstm_spec, 2: transformer_spec}
    cd = Codistiller(student, ex, replica=0, num_replicas=3, exchange_every=5,
                     loss=DistillLoss(temperature=2.0), model_spec=lstm_spec)
    others = {p: Codistiller(m, ex, replica=p, num_replicas=3, exchange_every=5, model_spec=specs[p])
              for p, m in peers.items()}
    others[1].publish(5)
    others[2].publish(10)
    cd.publish(10)
    assert cd.refresh(10) == {1: 5, 2: 10}
    state = cd.state_dict()
    assert {p: t["version"] for p, t in state["teachers"].items()} == {1: 5, 2: 10}
    assert state["teachers"][2]["meta"]["model"] == transformer_spec

    fresh = Codistiller(copy.deepcopy(student), MemoryExchange(), replica=0, num_replicas=3,
                        exchange_every=5, loss=DistillLoss(temperature=2.0), model_spec=lstm_spec)
    fresh.load_state_dict(state)
    assert fresh.teacher_versions() == cd.teacher_versions() == {1: 5, 2: 10}
    assert fresh.staleness(12) == cd.staleness(12) == {1: 7, 2: 2}
    assert isinstance(fresh.teachers[2].module, TransformerLM)  # built from the saved meta
    assert (fresh.stats().bytes_published, fresh.stats().bytes_read, fresh.last_exchange) == (
        cd.stats().bytes_published, cd.stats().bytes_read, 10)
    assert fresh.stats().bytes_read > 0 and fresh.stats().sync_wait_s == cd.stats().sync_wait_s
    want = cd.distill_loss(tokens, student(tokens), 12)
    got = fresh.distill_loss(tokens, fresh.model(tokens), 12)
    assert float(want.detach()) > 0 and torch.equal(got, want)
    for p in (1, 2):
        assert not fresh.teachers[p].module.training
        assert all(not q.requires_grad for q in fresh.teachers[p].module.parameters())
    # Nothing came from the fresh exchange, and the state holds copies, not the live teachers.
    assert fresh.exchange.versions(1) == []
    with torch.no_grad():
        cd.teachers[1].module.head.bias.add_(1.0)
    assert not torch.equal(fresh.teachers[1].module.head.bias, cd.teachers[1].module.head.bias)


def test_lock_step_refuses_a_damaged_version_that_newest_mode_skips(make_lm, tmp_path):
    ex = DirectoryExchange(str(tmp_path))
    models, cds = _replicas(make_lm, 2, ex, exchange_every=5)
    cds[1].publish(5)
    cds[1].publish(10)
    path = tmp_path / "replica-1" / f"{10:010d}.safetensors"
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    path.write_bytes(bytes(data))
    lock = Codistiller(models[0], ex, replica=0, num_replicas=2, exchange_every=5, wait=LockStep(1.0))
    with pytest.raises(RuntimeError, match="version 10 of peer 1 is missing or invalid"):
        lock.refresh(10)
    assert cds[0].refresh() == {1: 5}  # newest valid version instead
    for k, v in cds[0].teachers[1].module.state_dict().items():
        assert torch.equal(v, ex.load(1, 5).state[k]), k


def test_staleness_is_never_negative_when_a_peer_is_ahead(make_lm):
    ex = MemoryExchange()
    _, cds = _replicas(make_lm, 2, ex, exchange_every=5)
    cds[1].publish(50)  # the peer is far ahead
    cds[0].refresh(10)
    assert cds[0].teacher_versions() == {1: 50} and cds[0].staleness(10) == {1: 0}


def test_max_drift_waits_for_the_slowest_peer_and_times_out_clearly(make_lm, tmp_path):
    import time

    ex = DirectoryExchange(str(tmp_path))
    _, cds = _replicas(make_lm, 2, ex, exchange_every=5, wait=BoundedDrift(10, 0.3))
    cds[1].publish(5)
    cds[0].refresh(15)  # 15 - 10 = 5: the peer's version 5 is recent enough, no wait
    assert cds[0].stats().sync_wait_s < 0.2
    with pytest.raises(TimeoutError, match=r"replicas \[1\] have not published step 20.*max_drift=10"):
        cds[0].refresh(30)
    later = threading.Timer(0.1, cds[1].publish, args=(20,))
    later.start()
    t0 = time.perf_counter()
    assert cds[0].refresh(30) == {1: 20}  # waited for the peer, then loaded its version
    assert time.perf_counter() - t0 >= 0.09
    later.join()


def test_a_sharded_teacher_keeps_the_models_constants_and_predicts_as_its_peer():
    """FSDP2 teachers (one-rank group): a model whose constants are buffers outside its state
    dict (the click model's field offsets and limits) predicts exactly as the peer it was
    loaded from, through the sharded load and forward."""
    import torch.distributed as dist

    from codistill.exchange import MemoryExchange
    from codistill.models import build_model
    from codistill.parallel import is_sharded, layout

    spec = {"name": "click", "cardinalities": [7, 5, 3], "num_numeric": 2, "embed_dim": 4, "hidden": [8]}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard = layout("fsdp", dist.group.WORLD, "cpu")
        torch.manual_seed(0)
        peer, student = build_model(spec), build_model(spec)
        ex = MemoryExchange()
        ex.publish(1, 5, peer.state_dict(), {"model": spec})
        cd = Codistiller(student, ex, replica=0, num_replicas=2, exchange_every=5, loss="bce",
                         model_spec=spec, teachers=TeacherSpec(layout=shard))
        assert cd.refresh(5) == {1: 5}
        teacher = cd.teachers[1]
        assert is_sharded(teacher.module)
        x = (torch.tensor([[6, 4, 2], [0, 1, 0]]), torch.randn(2, 2))
        want = torch.sigmoid(peer(*x).float())
        torch.testing.assert_close(teacher.predict(x, "bce"), want)
    finally:
        dist.destroy_process_group()
