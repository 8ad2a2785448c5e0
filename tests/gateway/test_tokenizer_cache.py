"""--tokenizer-cache: new prompts stop growing the gateway's memory once the tokenizer's cache is full."""
import json
import subprocess
import sys
from pathlib import Path

from services.gateway.text import TextCodec

ROOT = Path(__file__).resolve().parents[2]  # the checkout under test, whatever the cwd

GROWTH = """
import json, random, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from services.gateway.text import TextCodec

def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) / 1024

entries = None if sys.argv[2] == "default" else int(sys.argv[2])
codec = TextCodec(Path(sys.argv[1]), entries)
rng = random.Random(0)
words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
pool = ThreadPoolExecutor(2)  # as the gateway tokenizes: off its event loop, in two threads

def encode(n):
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 24))) for _ in range(n)]
    return sum(len(ids) for ids in pool.map(codec.encode, prompts))  # the ids not kept

encode(4000)  # warm-up: the allocator arenas of the threads (~7 MiB), a full bounded cache
start = rss_mib()
encode(4000)  # 4000 new short prompts, each one cached word for a tokenizer that does not split words
print(json.dumps({"growth": rss_mib() - start, "bounded": codec.cache_bounded}))
"""


def growth(model, entries: str) -> dict:
    out = subprocess.run([sys.executable, "-c", GROWTH, str(model), entries], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_a_bounded_tokenizer_cache_stops_new_prompts_from_growing_the_gateway(demo_model):
    unbounded, bounded = growth(demo_model, "default"), growth(demo_model, "64")
    assert bounded["bounded"] and not unbounded["bounded"]
    assert unbounded["growth"] > 5, unbounded  # ~3.5 KiB a prompt with tokenizers' own bound (10,000 words)
    assert bounded["growth"] < unbounded["growth"] / 3, (bounded, unbounded)


def test_the_bound_changes_no_token(demo_model):
    prompts = ["hello world", "héllo wörld " * 40, "日本語のテキスト", "a b c d e f g"]
    plain, bounded = TextCodec(demo_model), TextCodec(demo_model, 0)
    first = [plain.encode(p) for p in prompts]
    assert [bounded.encode(p) for p in prompts] == first
    assert [plain.encode(p) for p in prompts] == first == [bounded.encode(p) for p in prompts]  # again, cached
