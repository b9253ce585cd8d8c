"""Which DF-RISE estimator has meaning on the embedded model? (issue 6)

For each estimator (sum, mean, contrast; see ``explainer.methods.rise.DFRise``) and mode: the map's
mean inside the drawn shape over its mean outside at the late steps (want > 1.5), its Spearman
correlation with the same method on a model whose UNet is re-initialised (want < 0.5), and the
insertion / deletion AUC (MSE) at the evaluation's step. Same masks for every estimator, each scored
by the SSIM structure term (the only similarity "sum" and "mean" can use; scripts/rise_similarity.py
compares the similarities).

    python scripts/rise_estimators.py --prompts 0 --late 16 20   # about 3 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: python scripts/rise_estimators.py

from explainer import config, metrics  # noqa: E402
from explainer.evaluate.protocol import default_prompts  # noqa: E402
from explainer.methods import DFRise  # noqa: E402
from explainer.models import load_model  # noqa: E402
from explainer.run import InstrumentedRun, RunSettings  # noqa: E402
from explainer.shapes.truth import shape_grid  # noqa: E402

FIXED_PROMPTS = ["a red circle on the left", "a big blue square at the top"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts added to the two fixed ones")
    parser.add_argument("--masks", type=int, default=500)
    parser.add_argument("--late", type=int, nargs="+", default=[16, 18, 20])
    parser.add_argument("--auc-step", type=int, default=15)
    parser.add_argument("--modes", nargs="+", default=["next-latent"], choices=["next-latent", "paper"])
    args = parser.parse_args(argv)

    model = load_model(config.EMBEDDED_MODEL_ID)
    random_model = model.randomised()
    variants = [(mode, estimator) for mode in args.modes for estimator in ("sum", "mean", "contrast")]
    rows = {variant: {"ratio": [], "spearman": [], "insertion": [], "deletion": []} for variant in variants}
    prompts = FIXED_PROMPTS + default_prompts(model.id, args.prompts)
    for index, prompt in enumerate(prompts):
        settings = RunSettings(prompt=prompt, seed=1, steps=20, guidance=model.spec.guidance, width=64, height=64)
        run = InstrumentedRun(model, settings).run_all().data
        mask = shape_grid(run)
        if not mask.any() or mask.all():
            print(f"{prompt!r}: no shape drawn, skipped")
            continue
        for mode, estimator in variants:
            method = DFRise(n_masks=args.masks, batch_size=100, mode=mode, estimator=estimator, similarity="structure")
            row = rows[mode, estimator]
            for step in args.late:
                trained = method.explain(model, run, step).saliency
                shuffled = method.explain(random_model, run, step).saliency
                row["ratio"].append(metrics.inside_outside_ratio(trained, mask))
                row["spearman"].append(metrics.spearman(trained, shuffled))
            scored = metrics.insertion_deletion(model, run, args.auc_step, method.explain(model, run, args.auc_step).saliency,
                                                distance="mse")
            row["insertion"].append(scored["insertion_auc"]), row["deletion"].append(scored["deletion_auc"])
        print(f"{index + 1}/{len(prompts)} {prompt!r}", flush=True)
    print(f"\nsteps {args.late}; {args.masks} masks; ratio: inside/outside (min, median); Spearman vs randomised (max, median); "
          f"AUC at step {args.auc_step} (MSE): insertion lower / deletion higher is better")
    for (mode, estimator), row in rows.items():
        ratio, rho = np.array(row["ratio"]), np.array(row["spearman"])
        print(f"  {mode:11s} {estimator:8s} ratio {ratio.min():.2f} / {np.median(ratio):.2f}   "
              f"spearman {np.nanmax(rho):.2f} / {np.nanmedian(rho):.2f}   "
              f"auc {np.mean(row['insertion']):.3f} / {np.mean(row['deletion']):.3f}")


if __name__ == "__main__":
    main()
