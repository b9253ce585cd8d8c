"""The evaluation of the explanation methods (docs/evaluation.md): ``python -m explainer.evaluate``
(``__main__``), its protocol and per-prompt numbers (``protocol``), and its tables (``tables``)."""
