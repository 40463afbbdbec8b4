"""Misinformation: a false story on scale-free vs high-clustering networks, and what stops it.

Agents carry ANES 1996 archetypes (party id x education); how convincing the story is to
each archetype and how readily it shares are a ``[K, S]`` table and a ``[K]`` vector
from a judgement function: the rule-based default (``--llm rule``, from
:mod:`substeps.information.judgement`) or, when the ``llm_archetypes`` layer is installed,
one call per archetype and stance through it (``--llm rule-backend|local|http``).
Roles: super-sharers, commentators, verifiers, bystanders. The story spreads by
ignorant/spreader/stifler dynamics on each network; interventions (from ``--detect``):

* ``fact_check``: a label that halves sharing and belief (share_mult x0.5, label_belief 0.5);
* ``downrank``: feeds show flagged posts 70% less often (visibility x0.3);
* ``removal``: the top 1% accounts by followers are removed before the story starts;
* ``prebunk``: 30% of agents are inoculated beforehand (acceptance x(1 - 0.6));
* ``all``: everything together.

Run: ``lpm run misinformation --agents 1000000 --steps 150 --out out/misinformation``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from lpm import Fixed, Intervention, Interval, Model, Modulate, Network, Params
from lpm.cli import Experiment
from lpm.outputs import OutputDir
from lpm.networks import clustering, friendship_paradox, preferential_attachment, small_world
from substeps.information import (
    ArchetypeProfile,
    InfoState,
    InfoSystem,
    Judgement,
    Spread,
    initial_information,
    information_observables,
    rule_judgement,
    top_spreaders,
)
from substeps.opinion import anes_population

INTERVENTIONS = ("none", "fact_check", "downrank", "removal", "prebunk", "all")
ROLE_SHARES = (0.83, 0.10, 0.05, 0.02)  # bystander, super-sharer, commentator, verifier


def _stance_label(s: float) -> str:
    return ("strongly liberal" if s <= -0.5 else "somewhat liberal" if s < -0.1 else
            "neutral" if s <= 0.1 else "somewhat conservative" if s < 0.5 else "strongly conservative")


def llm_judgement(profile: ArchetypeProfile, stances: torch.Tensor, backend: str = "rule-backend",
                  cache: str | None = None) -> Judgement:
    """The ``[K, S]`` / ``[K]`` tables asked of the archetype layer: K x S + K prompts, cached.

    ``backend``: ``rule-backend`` (llm_archetypes' deterministic RuleBackend answering with
    :func:`rule_judgement`, a consistency check of the plumbing), ``local`` (offline model)
    or ``http`` (OpenAI-compatible endpoint, ``$LPM_LLM_URL`` / ``$LPM_LLM_MODEL``).
    Answers are P(yes) of a yes/no question, read from the backend's option scores.
    """
    from llm_archetypes import Archetypes, Asker, AnswerCache, Distribution, Question, default_cache_dir, make_backend

    from substeps.opinion.anes import EDU_LABELS, PID_LABELS

    k = len(profile.names)
    if k != 14:
        raise ValueError(f"llm_judgement: expects the 14 ANES archetypes (party id x degree), got {k}")
    code = torch.arange(k)
    arch = Archetypes.from_attributes({"party": code // 2, "education": code % 2}, ["party", "education"],
                                      codebooks={"party": PID_LABELS, "education": EDU_LABELS})
    order = arch.codes[:, 0] * 2 + arch.codes[:, 1]  # archetype row of each llm_archetypes archetype
    rule = rule_judgement(profile, stances)

    def rule_answer(prompt) -> list[float]:
        row = PID_LABELS.index(prompt.attributes["party"]) * 2 + EDU_LABELS.index(prompt.attributes["education"])
        if "stance" in prompt.context:
            col = [_stance_label(float(x)) for x in stances].index(prompt.context["stance"])
            p = float(rule.convincing[row, col])
        else:
            p = float(rule.share_propensity[row] / (1 + rule.share_propensity.max()))
        return [p, 1 - p]

    be = make_backend("rule", rule=rule_answer) if backend == "rule-backend" else make_backend(backend)
    asker = Asker(be, cache=AnswerCache(cache or default_cache_dir() / "misinformation_answers.sqlite"))
    about = "A US adult who identifies as {party} and has {education}."
    convince = Question("story_convincing", about + "\nThey see a social-media post with a news story that takes a "
                        "{stance} political stance. Question: do they find the story convincing?",
                        Distribution(("yes", "no"), (1.0, 0.0)))
    share = Question("share_headline", about + "\nQuestion: when they believe a news headline they see on social media, "
                     "do they usually share it with their followers?", Distribution(("yes", "no"), (1.0, 0.0)))
    conv = torch.zeros(k, stances.numel())
    for j, s in enumerate(stances.tolist()):
        conv[order, j] = asker.ask_archetypes(arch, convince, {"stance": _stance_label(s)}).scores
    p_share = torch.zeros(k)
    p_share[order] = asker.ask_archetypes(arch, share, {}).scores
    print(f"archetype judgement via llm_archetypes ({be.name}): {asker.stats.as_dict()}")
    return Judgement(conv.clamp(0, 1), p_share / p_share.mean().clamp_min(1e-6), stances.float(), f"llm_archetypes:{be.name}")


def make_judge(kind: str) -> Callable[[ArchetypeProfile, torch.Tensor], Judgement]:
    """The judgement function: the built-in rule, or the archetype layer with a named backend."""
    if kind == "rule":
        return rule_judgement
    if kind not in ("rule-backend", "local", "http"):
        raise ValueError(f"--llm: expected rule, rule-backend, local or http, got {kind!r}")
    return lambda profile, stances: llm_judgement(profile, stances, backend=kind)


def build_network(kind: str, agents: int, seed: int, device: str) -> Network:
    """``scale-free`` (Barabasi-Albert, m = 5) or ``small-world`` (Watts-Strogatz, k = 10, p = 0.05)."""
    if kind == "scale-free":
        ei = preferential_attachment(agents, 5, seed=seed, device=device)
    else:
        ei = small_world(agents, 10, 0.05, seed=seed, device=device)
    return Network.from_layers({"follow": ei}, agents, coalesce=False)


def scenario(name: str, base: InfoSystem, net: Network, steps: int, detect: int, prebunk: torch.Tensor) -> tuple[list, InfoSystem]:
    """Intervention substeps and the system of one scenario (removed and prebunked agents)."""
    after = torch.ones(steps)
    after[detect:] = 0.0
    mods, st = [], base
    if name in ("fact_check", "all"):
        mods.append(Modulate("fact_check", "share_mult", "share_mult_base", [Intervention("label", 1 - 0.5 * (1 - after))]))
    if name in ("downrank", "all"):
        mods.append(Modulate("downrank", "visibility", "visibility_base", [Intervention("downrank", 1 - 0.7 * (1 - after))]))
    if name in ("removal", "all"):
        st = st.replace(removed=top_spreaders(net, 0.01))
    if name in ("prebunk", "all"):
        st = st.replace(prebunked=prebunk)
    return mods, st


def run(argv: Sequence[str]) -> int:
    """CLI: ANES archetypes, two networks, six intervention scenarios; HDF5, PNG and JSON out."""
    ap = argparse.ArgumentParser(prog="lpm run misinformation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=150, help="hours of spreading")
    ap.add_argument("--stance", type=float, default=0.7, help="stance of the story on [-1, 1] (+: conservative)")
    ap.add_argument("--share-rate", type=float, default=0.3)
    ap.add_argument("--stifle", type=float, default=0.3)
    ap.add_argument("--detect", type=int, default=6, help="step at which the story is flagged")
    ap.add_argument("--spreaders", type=int, default=100, help="agents spreading the story at step 0")
    ap.add_argument("--seeds", type=int, default=None, help=argparse.SUPPRESS)  # renamed: --seed is the RNG seed
    ap.add_argument("--networks", default="scale-free,small-world")
    ap.add_argument("--llm", default="rule", help="judgement: rule (built-in) or an llm_archetypes backend: rule-backend, local, http")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/misinformation")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    a = ap.parse_args(list(argv))
    if a.seeds is not None:
        ap.error("--seeds: renamed --spreaders (agents spreading at step 0); --seed is the random seed")
    # every output is checked before any work, and staged: a failed run leaves no partial files
    od = OutputDir(a.out, ("results.h5", "summary.json", "reach.png"), overwrite=a.overwrite)
    out = od.staging
    n, dev = a.agents, a.device
    pop = anes_population(n, seed=a.seed, device=dev)
    degree_share = torch.tensor([float(k % 2) for k in range(len(pop.names))])
    profile = ArchetypeProfile(pop.names, pop.ideology, pop.mean_age, degree_share)
    stances = torch.tensor([-a.stance, 0.0, a.stance])
    judgement = make_judge(a.llm)(profile, stances)
    g = torch.Generator(device=dev).manual_seed(a.seed + 7)
    role = torch.searchsorted(torch.tensor(ROLE_SHARES).cumsum(0).to(dev),
                              torch.rand(n, generator=g, device=dev), right=True).clamp_max(3).to(torch.int8)
    spreaders = torch.randperm(n, generator=g, device=dev)[: a.spreaders]
    role[spreaders] = 1
    prebunk = torch.rand(n, generator=g, device=dev) < 0.3
    spread = Spread(role_share=(0.5, 3.0, 1.5, 0.2), role_accept=(1.0, 1.0, 0.7, 0.05), label_belief=0.5)
    params = Params(share_rate=Interval(a.share_rate, 0, 1), stifle=Interval(a.stifle, 0, 1), prebunk_efficacy=Fixed(0.6))
    summary: dict = {"agents": n, "steps": a.steps, "seed": a.seed, "stance": a.stance, "judgement": judgement.source,
                     "convincing": judgement.convincing[:, 2].tolist(), "share_propensity": judgement.share_propensity.tolist(),
                     "archetypes": list(pop.names), "networks": {}}
    curves: dict[str, dict[str, torch.Tensor]] = {}
    mode = "w"
    for kind in [k for k in a.networks.split(",") if k]:
        if kind not in ("scale-free", "small-world"):
            ap.error(f"--networks: unknown {kind!r}; known: scale-free, small-world")
        t0 = time.perf_counter()
        net = build_network(kind, n, a.seed + 1, dev)
        ei = net.edge_index
        fp = friendship_paradox(ei, n)
        cl = clustering(ei, n, samples=200_000, seed=a.seed)
        info = {"build_seconds": time.perf_counter() - t0, "edges": net.num_edges,
                "friendship_paradox": {k: v for k, v in fp.items() if k != "knn"}, "clustering": cl, "scenarios": {}}
        base, state = initial_information(n, spreaders, network=net, role=role, archetype=pop.archetype,
                          convincing=judgement.convincing[:, 2], propensity=judgement.share_propensity,
                          stance=a.stance, device=dev)
        for name in INTERVENTIONS:
            mods, system = scenario(name, base, net, a.steps, a.detect, prebunk)
            model = Model([*mods, spread], information_observables(), state_type=InfoState, system_type=InfoSystem,
                          name=f"misinfo-{kind}-{name}")
            t1 = time.perf_counter()
            res = model.simulate(params, system, state, a.steps, seed=a.seed, device=dev, progress=False).detach()
            secs = time.perf_counter() - t1
            res.to_hdf5(str(out / "results.h5"), group=f"{kind}/{name}", mode=mode)
            mode = "a"
            curves.setdefault(kind, {})[name] = res["reach"]
            info["scenarios"][name] = {"final_reach": float(res["reach"][-1]), "final_believers": float(res["believers"][-1]),
                                       "peak_spreaders": float(res["spreaders"].max()), "seconds": secs,
                                       "agent_steps_per_second": n * a.steps / secs}
            print(f"{kind:12s} {name:11s} reach {float(res['reach'][-1]):.4f}  believers {float(res['believers'][-1]):.4f}  "
                  f"{n * a.steps / secs:,.0f} agent-steps/s")
        summary["networks"][kind] = info
    _plot(curves, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    od.commit()
    return 0


def _plot(curves: dict[str, dict[str, torch.Tensor]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (kind, by) in zip(axes.flat, curves.items()):
        for name, reach in by.items():
            ax.plot(range(1, reach.numel() + 1), reach.numpy(), label=name)
        ax.set_title(f"{kind}: share reached by the story")
        ax.set_xlabel("step")
        ax.set_ylim(0, None)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "reach.png", dpi=110)
    plt.close(fig)


EXPERIMENT = Experiment("misinformation", "A false story on scale-free vs small-world networks; fact-checks, down-ranking, removal, prebunking", run)
