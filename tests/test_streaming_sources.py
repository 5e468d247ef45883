"""The built-in data sources stream: ``documents(split)`` is an iterator that reads lazily (a
file, an article, an image, a clip at a time), the parts of a split in order give exactly its
documents, and the fingerprints of sources and tokenizers change when, and only when, the files
they stand for change."""

from __future__ import annotations

import bz2
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mot_core.errors import MotError
from mot_core.plugin_api import RawDocument
from plugins.images.data import CaptionedImages, CaptionedImagesOptions
from plugins.speech.audio import Audio
from plugins.speech.data import SpokenSentences, SpokenSentencesOptions
from plugins.text.data import TextFiles, TextFilesOptions, Wikipedia, WikipediaOptions, in_val_split

PLUGIN_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "timeseries_plugin"


def payload_key(payload):
    """Something comparable with == for any payload (tensors, audio clips, text)."""
    if isinstance(payload, torch.Tensor):
        return ("tensor", tuple(payload.shape), payload.numpy().tobytes())
    if isinstance(payload, Audio):
        return ("audio", payload.sample_rate, payload.samples.tobytes())
    return payload


def keys(docs) -> list:
    return [tuple((s.modality, payload_key(s.payload)) for s in doc.segments) for doc in docs]


def check_streams_and_parts(source, split: str) -> list[RawDocument]:
    """documents(split) is an iterator, not a list, and equals read_part over num_parts in order."""
    stream = source.documents(split)
    assert isinstance(stream, Iterator) and not isinstance(stream, (list, tuple))
    docs = list(stream)
    assert docs and all(isinstance(d, RawDocument) for d in docs)
    parts = [list(source.read_part(split, part)) for part in range(source.num_parts(split))]
    assert keys(d for part in parts for d in part) == keys(docs)
    with pytest.raises(MotError, match="part"):
        list(source.read_part(split, source.num_parts(split)))
    return docs


def touch(path: Path, seconds: float = 5.0) -> None:
    """A new modification time, nothing else changed."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + int(seconds * 1e9)))


# --- text_files ------------------------------------------------------------------------------


@pytest.mark.parametrize("split_documents", ["file", "paragraphs", "chunks"])
def test_text_files_stream_and_parts_give_the_same_documents(text_corpus, split_documents):
    source = TextFiles(TextFilesOptions(paths=[str(text_corpus / "*.txt")], val_fraction=0.2,
                                        split_documents=split_documents, chunk_chars=3000))
    files = sorted(text_corpus.glob("*.txt"))
    assert source.num_parts("train") == min(len(files), 64) == 64  # 80 files: contiguous groups
    for split in ("train", "val"):
        docs = check_streams_and_parts(source, split)
        if split_documents == "file":  # the documented rule, written out
            expected = [f.read_text() for f in files if in_val_split(f.name, 0.2) == (split == "val")]
            assert [d.segments[0].payload for d in docs] == expected


def test_text_files_read_one_file_at_a_time(text_corpus, monkeypatch):
    import plugins.text.data as text_data

    reads = []
    real_read = text_data._read
    monkeypatch.setattr(text_data, "_read", lambda file: reads.append(file) or real_read(file))
    source = TextFiles(TextFilesOptions(paths=[str(text_corpus / "*.txt")], split_documents="paragraphs"))
    stream = source.documents("train")
    assert reads == []
    next(stream)
    assert len(reads) == 1


def test_text_files_empty_split_is_still_an_error_at_the_end(tmp_path):
    (tmp_path / "only.txt").write_text("one document")
    source = TextFiles(TextFilesOptions(paths=[str(tmp_path / "only.txt")]))
    split = "train" if in_val_split("only.txt", 0.05) else "val"
    stream = source.documents(split)
    with pytest.raises(MotError, match=f"no documents in its '{split}' split: its only file"):
        list(stream)
    assert list(source.read_part(split, 0)) == []  # one part: empty, without the whole split's error


def test_text_files_fingerprint_follows_the_files(text_corpus, tmp_path):
    for name in sorted(p.name for p in text_corpus.glob("*.txt"))[:5]:
        (tmp_path / name).write_text((text_corpus / name).read_text())
    source = TextFiles(TextFilesOptions(paths=[str(tmp_path / "*.txt")]))
    first = source.fingerprint()
    assert TextFiles(TextFilesOptions(paths=[str(tmp_path / "*.txt")])).fingerprint() == first  # nothing changed
    some = sorted(tmp_path.glob("*.txt"))[2]
    touch(some)
    touched = source.fingerprint()
    assert touched != first
    some.write_text(some.read_text() + "\nmore")
    edited = source.fingerprint()
    assert edited not in (first, touched)
    (tmp_path / "new.txt").write_text("a new file")
    assert source.fingerprint() != edited
    assert TextFiles(TextFilesOptions(paths=[str(tmp_path / "*.txt")], val_fraction=0.1)).fingerprint() != source.fingerprint()


# --- wikipedia -------------------------------------------------------------------------------


def write_dump(path: Path, articles: list[tuple[str, str]]) -> Path:
    pages = "".join(
        f"<page><title>{title}</title><ns>0</ns><id>{i}</id><revision><id>{i}</id><text>{body}</text></revision></page>"
        for i, (title, body) in enumerate(articles, 1)
    )
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo><sitename>T</sitename></siteinfo>{pages}</mediawiki>'
    path.write_bytes(bz2.compress(xml.encode("utf-8")) if path.suffix == ".bz2" else xml.encode("utf-8"))
    return path


def article_titles(count: int) -> list[tuple[str, str]]:
    return [(f"Article {i}", f"Paragraph one of article {i} is long enough.\n\nParagraph two of article {i}.")
            for i in range(count)]


def test_wikipedia_of_ones_own_streams(tmp_path, monkeypatch):
    import plugins.text.data as text_data

    articles = article_titles(40)
    dump = write_dump(tmp_path / "dump.xml.bz2", articles)
    for split_documents in ("article", "paragraphs"):
        source = Wikipedia(WikipediaOptions(path=str(dump), min_chars=10, val_fraction=0.2,
                                            split_documents=split_documents, min_paragraph_chars=10))
        assert source.num_parts("train") == 1
        for split in ("train", "val"):
            docs = check_streams_and_parts(source, split)
            titles = [t for t, _ in articles if in_val_split(t, 0.2) == (split == "val")]
            assert [d.segments[0].payload.split("\n")[0] for d in docs] == [
                t for t in titles for _ in range(1 if split_documents == "article" else 2)]
    # A dump of one's own is never parsed whole up front, nor kept.
    monkeypatch.setattr(text_data, "load_wikipedia", lambda *a: pytest.fail("the whole dump was loaded"))
    stream = Wikipedia(WikipediaOptions(path=str(dump), min_chars=10)).documents("train")
    assert next(stream).segments[0].payload.startswith("Article")


def test_wikipedia_errors_and_fingerprint(tmp_path):
    with pytest.raises(MotError, match="wikipedia dump not found"):
        Wikipedia(WikipediaOptions(path=str(tmp_path / "absent.xml"))).documents("train")
    train_only = [(t, b) for t, b in article_titles(30) if not in_val_split(t, 0.05)][:2]
    dump = write_dump(tmp_path / "dump.xml", train_only)
    source = Wikipedia(WikipediaOptions(path=str(dump), min_chars=10))
    with pytest.raises(MotError, match="dataset 'wikipedia' has no documents in its 'val' split"):
        list(source.documents("val"))
    first = source.fingerprint()
    assert source.fingerprint() == first
    touch(dump)
    assert source.fingerprint() != first


def test_wikipedia_default_dump_streams_the_same_articles():
    from plugins.common.wikipedia import load_wikipedia

    source = Wikipedia(WikipediaOptions())
    stream = source.documents("val")
    assert isinstance(stream, Iterator)
    expected = [f"{t}\n\n{b}" for t, b in load_wikipedia(None, 500) if in_val_split(t, 0.05)]
    assert [d.segments[0].payload for d in stream] == expected
    assert source.fingerprint() == Wikipedia(WikipediaOptions()).fingerprint()


# --- captioned_images ------------------------------------------------------------------------


def colour(index: int) -> tuple[int, int, int]:
    return (index * 40 % 256, index * 90 % 256, 255 - index * 20 % 256)


@pytest.fixture
def image_data(tmp_path) -> tuple[Path, Path]:
    """(root holding a prepared source 'mine', a folder of one's own): small solid-colour images."""
    prepared = tmp_path / "root" / "mine"
    (prepared / "images").mkdir(parents=True)
    lines = []
    for i in range(8):
        Image.new("RGB", (8, 8), colour(i)).save(prepared / "images" / f"{i}.png")
        lines.append({"file": f"images/{i}.png", "caption": f"prepared {i}", "split": "val" if i % 4 == 0 else "train"})
    (prepared / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (prepared / "meta.json").write_text(json.dumps({"size": 8}))
    folder = tmp_path / "own"
    folder.mkdir()
    lines = []
    for i in range(10):
        Image.new("RGB", (12 + i, 10), colour(10 + i)).save(folder / f"photo{i}.png")
        lines.append({"file": f"photo{i}.png", "caption": f"own {i}", **({"split": "val"} if i == 3 else {})})
    (folder / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return prepared.parent, folder


def images_source(image_data, **options) -> CaptionedImages:
    root, folder = image_data
    return CaptionedImages(CaptionedImagesOptions(root=str(root), sources=["mine"], folders=[str(folder)], image_size=8,
                                                  val_fraction=0.3, caption_dropout=0.3, **options))


def test_captioned_images_stream_by_source_and_folder(image_data, monkeypatch):
    import plugins.images.data as image_data_module

    source = images_source(image_data)
    for split in ("train", "val"):
        assert source.num_parts(split) == 2  # one per source and folder
        docs = check_streams_and_parts(source, split)
        captions = [s.payload for d in docs for s in d.segments if s.modality == "text"]
        assert captions[0].startswith("prepared") and captions[-1].startswith("own")
        for doc in docs:
            for segment in doc.segments:
                if segment.modality == "image":  # solid colours come through exactly
                    assert segment.payload.shape == (3, 8, 8) and segment.payload.is_contiguous()
    # Smaller parts: the same documents, in the same order.
    whole = keys(source.documents("train"))
    monkeypatch.setattr(image_data_module, "IMAGES_PER_PART", 3)
    assert source.num_parts("train") > 2
    check_streams_and_parts(source, "train")
    assert keys(d for p in range(source.num_parts("train")) for d in source.read_part("train", p)) == whole


def test_captioned_images_decode_each_image_as_it_is_taken(image_data, monkeypatch):
    import plugins.images.data as image_data_module

    decoded = []
    real_prepared, real_any = image_data_module.read_prepared_image, image_data_module.read_any_image
    monkeypatch.setattr(image_data_module, "read_prepared_image", lambda *a: decoded.append(a[0]) or real_prepared(*a))
    monkeypatch.setattr(image_data_module, "read_any_image", lambda *a: decoded.append(a[0]) or real_any(*a))
    stream = images_source(image_data, directions=["image_to_caption"]).documents("train")
    assert decoded == []
    first = next(stream)
    assert len(decoded) == 1
    expected = torch.tensor(colour(1), dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    assert torch.equal(first.segments[0].payload, expected.expand(3, 8, 8))


def test_captioned_images_errors_still_name_the_split(image_data):
    root, folder = image_data
    only_train = CaptionedImages(CaptionedImagesOptions(folders=[str(folder)], image_size=8, val_fraction=0.01,
                                                        max_images_per_source=2))
    with pytest.raises(MotError, match="has no images in its 'val' split"):
        list(only_train.documents("val"))
    (root / "mine" / "images" / "1.png").unlink()
    stream = images_source(image_data).documents("train")
    with pytest.raises(MotError, match="1.png"):
        list(stream)


def test_captioned_images_fingerprint_follows_captions_and_images(image_data):
    root, folder = image_data
    source = images_source(image_data)
    first = source.fingerprint()
    assert images_source(image_data).fingerprint() == first
    touch(folder / "photo4.png")
    second = source.fingerprint()
    assert second != first
    touch(root / "mine" / "images" / "2.png")
    third = source.fingerprint()
    assert third != second
    captions = folder / "captions.jsonl"
    captions.write_text(captions.read_text().replace("own 5", "own five"))
    fourth = source.fingerprint()
    assert fourth != third
    (folder / "unrelated.txt").write_text("not listed")  # a file no captions line names: ignored
    assert source.fingerprint() == fourth


# --- spoken_sentences ------------------------------------------------------------------------


@pytest.fixture
def recordings(tmp_path) -> Path:
    import soundfile

    rate = 16000
    lines = []
    for i in range(9):
        t = np.arange(int(rate * 0.2)) / rate
        soundfile.write(tmp_path / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32), rate)
        lines.append(json.dumps({"file": f"clip{i}.wav", "text": f"sentence number {i}", **({"split": "val"} if i in (2, 5) else {})}))
    (tmp_path / "transcripts.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def spoken(folder: Path) -> SpokenSentences:
    return SpokenSentences(SpokenSentencesOptions(root=str(folder), synthesis=None, val_fraction=0.01))


def test_spoken_sentences_stream_and_load_each_clip_as_it_is_taken(recordings, monkeypatch):
    import plugins.speech.data as speech_data

    source = spoken(recordings)
    for split in ("train", "val"):
        docs = check_streams_and_parts(source, split)
        texts = [s.payload for d in docs[0::2] for s in d.segments if s.modality == "text"]
        assert texts == [f"sentence number {i}" for i in range(9) if (i in (2, 5)) == (split == "val")]
    monkeypatch.setattr(speech_data, "CLIPS_PER_PART", 2)
    assert source.num_parts("train") == 4
    check_streams_and_parts(source, "train")
    loaded = []
    real_load = speech_data.load_audio_file
    monkeypatch.setattr(speech_data, "load_audio_file", lambda path: loaded.append(path) or real_load(path))
    stream = spoken(recordings).documents("train")
    assert loaded == []
    first, second = next(stream), next(stream)  # both directions of the first clip
    assert len(loaded) == 1 and first.segments[1].payload is second.segments[0].payload


def test_spoken_sentences_fingerprint_follows_transcripts_and_clips(recordings):
    source = spoken(recordings)
    first = source.fingerprint()
    assert spoken(recordings).fingerprint() == first
    touch(recordings / "clip4.wav")
    second = source.fingerprint()
    assert second != first
    transcripts = recordings / "transcripts.jsonl"
    transcripts.write_text(transcripts.read_text().replace("number 7", "number seven"))
    assert source.fingerprint() != second


# --- the example plugin's CSV source ---------------------------------------------------------


def test_timeseries_csv_fingerprint_follows_its_files(tmp_path):
    sys.path.insert(0, str(PLUGIN_SOURCE))
    try:
        from mot_timeseries.datasource import TimeSeriesCSV, TimeSeriesCSVOptions, bundled_files
    finally:
        sys.path.remove(str(PLUGIN_SOURCE))
    spec = bundled_files()[0]
    copy = tmp_path / "sunspots.csv"
    copy.write_bytes(Path(spec.path).read_bytes())
    options = TimeSeriesCSVOptions(files=[spec.model_copy(update={"path": str(copy)})])
    first = TimeSeriesCSV(options).fingerprint()
    assert TimeSeriesCSV(options).fingerprint() == first
    touch(copy)
    assert TimeSeriesCSV(options).fingerprint() != first
    assert isinstance(TimeSeriesCSV(options).documents("val"), list)  # small: still a plain list


# --- modality fingerprints -------------------------------------------------------------------


def test_image_vq_fingerprint_follows_its_tokenizer_not_its_code_cache(tmp_path):
    from plugins.image_vq.modality import ImageVQ, ImageVQOptions
    from plugins.image_vq.tokenizer_io import save_vq_tokenizer
    from plugins.image_vq.vqgan import VQGAN, VQGANConfig

    small = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=4, n_embed=16, resolution=8)
    folder = tmp_path / "vq"
    torch.manual_seed(0)
    save_vq_tokenizer(VQGAN(VQGANConfig(**small)), {}, folder)
    modality = ImageVQ(ImageVQOptions(tokenizer_dir=str(folder), architecture=small), tmp_path / "state")
    modality.prepare([])
    first = modality.fingerprint()
    modality.encode(torch.zeros(3, 8, 8))  # writes the code cache next to the tokenizer
    assert list(folder.glob("codes-*.pt"))
    (folder / "features.safetensors").write_bytes(b"an evaluation network")
    assert modality.fingerprint() == first
    torch.manual_seed(1)
    save_vq_tokenizer(VQGAN(VQGANConfig(**small)), {}, folder)  # refitted: other weights, same config
    assert modality.fingerprint() != first


def test_image_diffusion_fingerprint_follows_its_vae_not_its_latent_cache(tmp_path):
    from plugins.image_diffusion.modality import ImageDiffusion, ImageDiffusionOptions
    from plugins.image_diffusion.vae import _save_atomically, build_vae, resolve_architecture

    tiny = {"block_out_channels": [8, 16], "norm_num_groups": 4, "sample_size": 16}
    folder = tmp_path / "vae"
    torch.manual_seed(0)
    _save_atomically(build_vae(tiny), {"architecture": resolve_architecture(tiny)}, folder)
    modality = ImageDiffusion(ImageDiffusionOptions(tokenizer_dir=str(folder), vae=tiny, image_size=16), tmp_path / "state")
    modality.prepare([])
    first = modality.fingerprint()
    modality.encode(torch.zeros(3, 16, 16))  # writes the latent cache next to the VAE
    assert list(folder.glob("latents-*.safetensors"))
    assert modality.fingerprint() == first
    torch.manual_seed(1)
    _save_atomically(build_vae(tiny), {"architecture": resolve_architecture(tiny)}, folder)
    assert modality.fingerprint() != first


def test_speech_fingerprint_follows_its_units(tmp_path):
    from plugins.speech.modality import Speech, SpeechOptions
    from plugins.speech.units import FeatureConfig, UnitTokenizer

    folder = tmp_path / "units"
    config = FeatureConfig()
    UnitTokenizer(config, torch.randn(8, config.dim, generator=torch.Generator().manual_seed(0)), {}).save(folder)
    modality = Speech(SpeechOptions(tokenizer_dir=str(folder), n_units=8), tmp_path / "state")
    modality.prepare([])
    first = modality.fingerprint()
    assert Speech(SpeechOptions(tokenizer_dir=str(folder), n_units=8), tmp_path / "state").fingerprint() == first
    UnitTokenizer(config, torch.randn(8, config.dim, generator=torch.Generator().manual_seed(1)), {}).save(folder)
    assert modality.fingerprint() != first
