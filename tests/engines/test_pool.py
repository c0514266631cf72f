"""The pool loads lazily and once, leaves nothing behind on failure, and never evicts what is in use."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from engines.catalog import AdapterPolicy, AdapterSpec, BaseSpec, Catalog
from engines.errors import AdapterRejected, ModelLoadFailed, Overloaded
from engines.loader import BasePlan, LoadedModel, load_base
from engines.names import ModelName
from engines.pool import ModelPool
from tests.conftest import TinyModels


def catalog(models: TinyModels) -> Catalog:
    return Catalog(
        bases=(
            BaseSpec(name="tiny", source=str(models.base), dtype="float32", aliases=("test-org/tiny-base",)),
        ),
        adapters=(AdapterSpec(alias="lora", source=str(models.adapter), base="tiny"),),
        policy=AdapterPolicy(adapter_dirs=(models.adapter_dirs,)),
    )


def counting_loader(delay: float = 0.0) -> tuple[list[str], object]:
    calls: list[str] = []
    lock = threading.Lock()

    def load(spec: BaseSpec, plan: BasePlan) -> LoadedModel:
        with lock:
            calls.append(spec.name)
        time.sleep(delay)
        return load_base(spec, plan)

    return calls, load


def test_ten_concurrent_first_requests_load_base_and_variant_once(tiny_models: TinyModels) -> None:
    calls, loader = counting_loader(delay=0.2)
    pool = ModelPool(catalog(tiny_models), base_loader=loader)  # type: ignore[arg-type]

    async def scenario() -> None:
        leases = await asyncio.gather(*(pool.acquire(ModelName.parse("tiny+lora")) for _ in range(10)))
        assert len({id(lease.loaded) for lease in leases}) == 1
        for lease in leases:
            lease.release()

    asyncio.run(scenario())
    assert calls == ["tiny"]
    assert pool.stats.loads == {"tiny": 1, f"tiny+{tiny_models.adapter}": 1}


def test_failed_base_load_leaves_nothing_and_can_be_retried(tiny_models: TinyModels, tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "not-yet"
    pool = ModelPool(
        Catalog(bases=(BaseSpec(name="later", source=str(missing), dtype="float32"),)),
    )

    async def scenario() -> None:
        with pytest.raises(ModelLoadFailed):
            await pool.acquire(ModelName.parse("later"))
        assert pool.entries() == []
        import shutil

        shutil.copytree(tiny_models.base, missing)
        lease = await pool.acquire(ModelName.parse("later"))
        lease.release()

    asyncio.run(scenario())
    assert [entry.key for entry in pool.entries()] == ["later"]


def test_rejected_adapter_keeps_base_loaded_and_untouched(tiny_models: TinyModels) -> None:
    pool = ModelPool(catalog(tiny_models))

    async def scenario() -> None:
        lease = await pool.acquire(ModelName.parse("tiny"))
        before = {k: v.clone() for k, v in lease.loaded.model.state_dict().items()}
        lease.release()
        with pytest.raises(AdapterRejected):
            await pool.acquire(ModelName.parse("tiny+other-base-lora"))
        after = lease.loaded.model.state_dict()
        assert all((before[k] == after[k]).all() for k in before)

    asyncio.run(scenario())
    assert [entry.key for entry in pool.entries()] == ["tiny"]


def test_idle_variants_are_evicted_lru_but_leased_ones_stay(tiny_models: TinyModels) -> None:
    lenient = catalog(tiny_models)
    pool = ModelPool(replace(lenient, policy=replace(lenient.policy, base_match="warn")), max_models=2)

    async def scenario() -> None:
        held = await pool.acquire(ModelName.parse("tiny+lora"))  # base + variant = 2 entries
        # A third entry would exceed the count; nothing idle can go (the variant pins the base).
        with pytest.raises(Overloaded):
            await pool.acquire(ModelName.parse("tiny+other-base-lora"))
        assert len(pool.entries()) == 2
        held.release()
        # Now the idle variant is evicted to make room for another variant.
        other = await pool.acquire(ModelName.parse("tiny+other-base-lora"))
        other.release()

    asyncio.run(scenario())
    keys = sorted(entry.key for entry in pool.entries())
    assert keys[0] == "tiny" and keys[1].endswith("other-base-lora")
    assert sum(pool.stats.evictions.values()) == 1


def test_eviction_under_a_small_budget_keeps_in_flight_requests_correct(tiny_models: TinyModels) -> None:
    from engines.engine import Engine, EngineLimits
    from engines.sampling import SamplingParams

    lenient = catalog(tiny_models)
    lenient = replace(lenient, policy=replace(lenient.policy, base_match="warn"))
    models = ["tiny", "tiny+lora", "tiny+other-base-lora"]

    async def answer(engine: Engine, model: str) -> str:
        lease = await engine.acquire(model)
        try:
            request = engine.text_request(
                lease, "budget", max_tokens=20, sampling=SamplingParams(temperature=0)
            )
            return "".join([event.text async for event in engine.generate(lease, request)])
        finally:
            lease.release()

    roomy = Engine(lenient, EngineLimits())
    try:
        expected = {m: asyncio.run(answer(roomy, m)) for m in models}
    finally:
        roomy.close()

    tight = Engine(lenient, EngineLimits(max_models=2))  # the base plus one variant at a time
    try:

        async def flood() -> list[tuple[str, str | BaseException]]:
            jobs = [models[i % 3] for i in range(12)]
            results = await asyncio.gather(*(answer(tight, m) for m in jobs), return_exceptions=True)
            return list(zip(jobs, results, strict=True))

        outcomes = asyncio.run(flood())
        for model, result in outcomes:
            if isinstance(result, BaseException):
                assert isinstance(result, Overloaded), result  # refused cleanly, never a wrong answer
            else:
                assert result == expected[model]
        assert any(not isinstance(r, BaseException) for _m, r in outcomes)
        # Both variants were asked for and only one fits beside the base: the second one to come either
        # evicted the first (idle by then) or was refused while the first was in use; never both held.
        refused = sum(isinstance(r, BaseException) for _m, r in outcomes)
        assert sum(tight.pool.stats.evictions.values()) >= 1 or refused >= 1
        assert len(tight.pool.entries()) <= 2
        for model in models:  # once the flood is over, everything fits again, one after another
            assert asyncio.run(answer(tight, model)) == expected[model]
        assert len(tight.pool.entries()) <= 2
    finally:
        tight.close()


def test_model_larger_than_the_budget_is_refused_before_loading(tiny_models: TinyModels) -> None:
    calls, loader = counting_loader()
    pool = ModelPool(catalog(tiny_models), max_bytes=1024, base_loader=loader)  # type: ignore[arg-type]

    async def scenario() -> None:
        with pytest.raises(Overloaded, match="more than this gateway's whole memory budget"):
            await pool.acquire(ModelName.parse("tiny"))

    asyncio.run(scenario())
    assert calls == [] and pool.entries() == []


def test_variant_estimate_matches_what_the_merge_allocates(tiny_models: TinyModels) -> None:
    from engines.adapters.files import AdapterRef, read_adapter_files
    from engines.adapters.variants import build_variant, estimate_merge_bytes, targeted_linears
    from engines.loader import plan_base_load

    spec = catalog(tiny_models).bases[0]
    base = load_base(spec)
    assert 0.99 * base.nbytes <= plan_base_load(spec, None).resident_bytes <= base.nbytes  # + buffers
    files = read_adapter_files(
        AdapterRef(kind="local", source=str(tiny_models.adapter)), tiny_models.adapter, AdapterPolicy()
    )
    variant = build_variant(base, files, "v").nbytes
    one_layer_fp32 = 4 * max(layer.weight.numel() for layer in targeted_linears(base.model, files).values())
    assert estimate_merge_bytes(files, base) == variant + one_layer_fp32


def test_loads_and_merges_run_on_threads_that_end_with_them(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived loader thread would keep an OpenMP team that slows the engine's decode steps."""
    import engines.pool

    workers: list[threading.Thread] = []
    real_build_variant = engines.pool.build_variant

    def load(spec: BaseSpec, plan: BasePlan) -> LoadedModel:
        workers.append(threading.current_thread())
        return load_base(spec, plan)

    def build_variant(*args: object) -> LoadedModel:
        workers.append(threading.current_thread())
        return real_build_variant(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engines.pool, "build_variant", build_variant)
    pool = ModelPool(catalog(tiny_models), base_loader=load)

    async def scenario() -> None:
        (await pool.acquire(ModelName.parse("tiny+lora"))).release()
        assert len(workers) == 2 and threading.main_thread() not in workers
        for worker in workers:  # checked while the loop (and any executor it owns) is still running
            worker.join(timeout=5)
            assert not worker.is_alive()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def seven_adapters(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from engines.testing.tiny import save_tiny_adapter

    root = tmp_path_factory.mktemp("seven")
    for index in range(7):
        save_tiny_adapter(
            tiny_models.base,
            root / f"a{index}",
            seed=10 + index,
            base_model_name_or_path="test-org/tiny-base",
        )
    return [str(root / f"a{index}") for index in range(7)]


@pytest.mark.parametrize("mode", ["multi", "auto", "merge"])
def test_eviction_churn_never_serves_another_adapters_answer(
    tiny_models: TinyModels, seven_adapters: list[str], mode: str
) -> None:
    """Bursts of first requests for different adapters while a 3-model cache evicts under them.

    A fresh entry used to be handed to its waiters unleased: a concurrent load could evict it (freeing
    its unmerged slot) before they resumed, and they then ran on a freed or reused slot.
    """
    from engines.engine import Engine, EngineLimits
    from engines.sampling import SamplingParams

    root = Path(seven_adapters[0]).parent
    spec = BaseSpec(name="tiny", source=str(tiny_models.base), dtype="float32", adapter_mode=mode)
    catalog = Catalog(bases=(spec,), policy=AdapterPolicy(adapter_dirs=(root,), base_match="warn"))
    models = [f"tiny+{Path(a).name}" for a in seven_adapters]

    async def answer(engine: Engine, model: str) -> str:
        lease = await engine.acquire(model)
        try:
            request = engine.text_request(
                lease, "churn", max_tokens=12, sampling=SamplingParams(temperature=0)
            )
            return "".join([event.text async for event in engine.generate(lease, request)])
        finally:
            lease.release()

    roomy = Engine(catalog, EngineLimits(prefix_cache_bytes=0))
    try:
        expected = {model: asyncio.run(answer(roomy, model)) for model in models}
    finally:
        roomy.close()
    assert len(set(expected.values())) == len(models)  # every adapter answers differently
    tight = Engine(catalog, EngineLimits(max_models=3, prefix_cache_bytes=0))
    if mode == "auto":
        tight.pool.merge_after = 2
    wrong: list[tuple[str, str]] = []
    served = refused = 0
    try:

        async def bursts() -> None:
            nonlocal served, refused
            for burst in range(14):
                jobs = [models[(burst * 3 + offset) % len(models)] for offset in range(4)]
                results = await asyncio.gather(*(answer(tight, m) for m in jobs), return_exceptions=True)
                for model, result in zip(jobs, results, strict=True):
                    if isinstance(result, BaseException):
                        assert isinstance(result, Overloaded), result
                        refused += 1
                    elif result != expected[model]:
                        wrong.append((model, result))
                    else:
                        served += 1

        asyncio.run(bursts())
    finally:
        tight.close()
    assert wrong == []
    assert served >= 28 and sum(tight.pool.stats.evictions.values()) >= 5
