"""Gold scorers for the evaluation tests, imported by name (--gold gold_scorers:length)."""


def length(prompts: list[str], responses: list[str]) -> list[float]:
    assert len(prompts) == len(responses)
    return [float(len(r)) for r in responses]
