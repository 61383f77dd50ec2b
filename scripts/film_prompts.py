"""Write experiments/prompts/films.jsonl: task-like prompts for `generate(...)` data, from genres and
phrasings alone. Written without reading the evaluation's questions: no film title appears in
any prompt, so the teacher's continuations are its own knowledge of films, never the test items.

    python scripts/film_prompts.py
"""

import json
from pathlib import Path

GENRES = ["action", "comedy", "drama", "science fiction", "horror", "romantic comedy", "animated", "crime",
          "thriller", "fantasy", "western", "war", "musical", "family", "adventure", "mystery"]
FRAMES = [
    "The best {g} movies of all time, ranked:\n1.",
    "If you like {g} films, here are ten more movies you will enjoy:\n1.",
    "My favourite {g} movies are",
    "Fans of classic {g} films from the 1980s and 1990s often recommend",
    "A list of {g} movies that everyone should watch at least once:\n-",
    "People who enjoyed one famous {g} movie usually also like",
]

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "experiments" / "prompts" / "films.jsonl"
    out.write_text("".join(json.dumps({"text": f.format(g=g)}) + "\n" for f in FRAMES for g in GENRES))
    print(out)
