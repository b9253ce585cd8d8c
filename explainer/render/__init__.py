"""What a person looks at, drawn from records and explanations: ``pictures`` (a step's picture, a map
laid over a picture), ``views`` (per-word maps and overlays, step summaries) and ``charts``
(matplotlib, outside pyplot). The methods and metrics import nothing from here."""
