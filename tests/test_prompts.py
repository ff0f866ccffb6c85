"""Prompt sets: nested prefixes, per-position seeds, the COCO protocol, and clear input errors."""

import json
import random

import pytest

from schedsearch import prompts
from schedsearch.prompts import SEED_STRIDE


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i}\n" + ("\n" if i % 7 == 0 else "")
                            for i in range(300)), encoding="utf-8")
    return str(path)


def test_smaller_sets_are_prefixes_of_larger_ones(text_file):
    small, large = prompts.load(text_file, 64, seed=3), prompts.load(text_file, 128, seed=3)
    assert small.prompts == large.prompts[:64]
    assert small.seeds == large.seeds[:64]
    # blank lines are skipped, so position i holds the i-th non-empty line
    assert large.prompts[100] == "prompt number 100"
    assert large.seeds[100] == 3 * SEED_STRIDE + 100
    assert prompts.load(text_file, None, seed=3).prompts[:128] == large.prompts


def test_the_same_arguments_give_the_same_set(text_file):
    a, b = prompts.load(text_file, 50, seed=1), prompts.load(text_file, 50, seed=1)
    assert a == b and a.fingerprint() == b.fingerprint()
    other_seed = prompts.load(text_file, 50, seed=2)
    assert other_seed.prompts == a.prompts and other_seed.fingerprint() != a.fingerprint()
    assert prompts.load(text_file, 49, seed=1).fingerprint() != a.fingerprint()
    info = a.as_json()
    assert info == {"source": "prompts.txt@seed1", "n": 50, "fingerprint": a.fingerprint(),
                    "seeds": [SEED_STRIDE, SEED_STRIDE + 49]}


def test_class_prompts_cycle_through_the_labels():
    s = prompts.load("classes:10", 25, seed=0)
    assert list(s.prompts) == [i % 10 for i in range(25)]
    assert list(s.seeds) == list(range(25))
    assert len(prompts.load("classes:4")) == 4
    for bad in ("classes:x", "classes:0"):
        with pytest.raises(ValueError, match="classes:K"):
            prompts.load(bad, 5)


def test_heldout_set_follows_the_search_set_with_disjoint_seeds(text_file):
    search, held = prompts.split(text_file, 100, 60, seed=5)
    assert len(search) == 100 and len(held) == 60
    assert search.prompts == prompts.load(text_file, 100, seed=5).prompts
    assert held.prompts[0] == "prompt number 100"
    assert not set(search.seeds) & set(held.seeds)
    assert held.seeds == tuple(5 * SEED_STRIDE + i for i in range(100, 160))
    # and a held-out set under another seed never collides with any search seed either
    _, held2 = prompts.split(text_file, 100, 60, seed=6)
    assert not set(search.seeds) & set(held2.seeds)
    with pytest.raises(ValueError, match="holds only 300"):
        prompts.split(text_file, 250, 60)


def _coco(path, n_images=40, per_image=5, seed=0):
    """A captions file shaped like COCO's: several captions per image, annotation ids shuffled."""
    rng = random.Random(seed)
    anns = []
    ann_ids = rng.sample(range(10_000, 99_999), n_images * per_image)
    for img in range(n_images):
        image_id = 1000 + 37 * img
        for c in range(per_image):
            anns.append({"image_id": image_id, "id": ann_ids[img * per_image + c],
                         "caption": f"  image {image_id} caption {c} "})
    rng.shuffle(anns)
    path.write_text(json.dumps({"images": [], "annotations": anns}), encoding="utf-8")
    return anns


def test_coco_protocol_shuffles_images_and_keeps_one_caption_each(tmp_path):
    path = tmp_path / "captions_val2014.json"
    anns = _coco(path)
    s = prompts.load(str(path), None, seed=42)
    # the paper's protocol: the image ids, shuffled with the seed; one caption per image, here the
    # caption with the lowest annotation id
    ids = sorted({a["image_id"] for a in anns})
    random.Random(42).shuffle(ids)
    lowest = {}
    for a in anns:
        if a["image_id"] not in lowest or a["id"] < lowest[a["image_id"]]["id"]:
            lowest[a["image_id"]] = a
    assert list(s.prompts) == [lowest[i]["caption"].strip() for i in ids]
    assert len(s) == 40 and len({p.split(" caption")[0] for p in s.prompts}) == 40
    assert s.seeds[0] == 42 * SEED_STRIDE
    # the order depends on the seed, and a prefix is the same images
    assert prompts.load(str(path), None, seed=7).prompts != s.prompts
    assert prompts.load(str(path), 10, seed=42).prompts == s.prompts[:10]


def test_coco_file_errors(tmp_path):
    not_coco = tmp_path / "x.json"
    not_coco.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        prompts.load(str(not_coco))
    broken = tmp_path / "y.json"
    broken.write_text(json.dumps({"annotations": [{"id": 1, "caption": "no image id"}]}))
    with pytest.raises(ValueError, match="image_id and caption"):
        prompts.load(str(broken))
    # ids of mixed types cannot be sorted, a list cannot be a key: both were tracebacks
    for image_ids in ([1, "2"], [[1], [2]], [True, 2]):
        broken.write_text(json.dumps({"annotations": [{"image_id": i, "id": k, "caption": "c"}
                                                      for k, i in enumerate(image_ids)]}))
        with pytest.raises(ValueError, match="image_id and id must be integers"):
            prompts.load(str(broken))
    broken.write_text(json.dumps({"annotations": [{"image_id": 1, "id": "a", "caption": "c"},
                                                  {"image_id": 1, "id": 2, "caption": "d"}]}))
    with pytest.raises(ValueError, match="image_id and id must be integers, got image_id 1, id 'a'"):
        prompts.load(str(broken))


def test_csv_uses_the_caption_column_and_names_the_columns_when_it_is_missing(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,text\n1,"a cat, sitting"\n2,\n3, a dog \n', encoding="utf-8")
    s = prompts.load(str(path), caption_column="text")
    assert s.prompts == ("a cat, sitting", "a dog")
    msg = r"no column 'caption' \(columns: \['id', 'text'\]\).*--caption-column"
    with pytest.raises(ValueError, match=msg):
        prompts.load(str(path))


def test_empty_inputs_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prompts.load(str(empty))
    header_only = tmp_path / "h.csv"
    header_only.write_text("caption\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prompts.load(str(header_only))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompts.load(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=">= 1"):
        prompts.load("classes:3", 0)


def test_take_refuses_to_run_past_the_end(text_file):
    s = prompts.load(text_file, 10)
    assert s.take(2, 5).prompts == s.prompts[2:5]
    with pytest.raises(ValueError, match="too few prompts"):
        s.take(5, 11)


def test_a_folder_is_not_a_prompt_file(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder.*one prompt per line.*classes:K") as info:
        prompts.load(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "does not exist" not in str(info.value)


def test_broken_json_names_the_file_and_the_place(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text('{"annotations": [{"image_id": 1, "caption": "a cat"},\n ]}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions\.json.*not valid JSON.*line 2") as info:
        prompts.load(str(path))
    assert type(info.value) is ValueError   # not a bare JSONDecodeError
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["p.txt", "p.csv", "p.json"])
def test_a_file_that_is_not_utf8_names_the_file_and_the_encoding(tmp_path, name):
    path = tmp_path / name
    path.write_bytes("caption\nun café au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{name}.*not UTF-8 text.*byte 0xe9") as info:
        prompts.load(str(path))
    assert type(info.value) is ValueError   # not a bare UnicodeDecodeError


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\na dog\n", encoding="utf-8-sig")
    assert prompts.load(str(text)).prompts == ("a cat", "a dog")
    table = tmp_path / "p.csv"
    table.write_text("caption,id\na cat,1\n", encoding="utf-8-sig")
    assert prompts.load(str(table)).prompts == ("a cat",)
