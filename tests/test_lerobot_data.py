"""LeRobot v3 folders, written here with real mp4 videos (PyAV) and parquet files
(pyarrow): samples, action chunks at episode ends and their pad mask, the codecs the reader
decodes, statistics, the collate through a processor, the model check, and the folder
problems that must fail first."""

import json

import pytest
import torch

av = pytest.importorskip("av")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from vlakit.data import DatasetError, InMemoryDataset, LeRobotDataset, collate_with  # noqa: E402

CAMERAS = ("observation.images.top", "observation.images.wrist")
LENGTHS = (5, 4)
FPS = 10


def _shade(camera: int, episode: int, t: int) -> int:
    return 30 + 60 * camera + 40 * episode + 8 * t


# encoder -> its options for near-lossless frames (flat colours survive within a few levels)
CODECS = {"mpeg4": {"qscale": "1"}, "libsvtav1": {"crf": "10", "preset": "12"},
          "libx264": {"crf": "0"}, "libx265": {"crf": "1", "log-level": "error"},
          "libvpx-vp9": {"crf": "4", "b": "0"}}


def _write_video(path, frames, codec="mpeg4"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = CODECS[codec]
        for value in frames:
            image = torch.full((32, 32, 3), value, dtype=torch.uint8).numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_dataset(root, lengths=LENGTHS, codec="mpeg4"):
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    features = {cam: {"dtype": "video", "shape": [32, 32, 3]} for cam in CAMERAS}
    features.update({"observation.state": {"dtype": "float32", "shape": [3]},
                     "action": {"dtype": "float32", "shape": [2]}})
    (root / "meta" / "info.json").write_text(json.dumps({
        "codebase_version": "v3.0", "fps": FPS, "features": features,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "total_episodes": len(lengths), "total_frames": sum(lengths)}))
    pq.write_table(pa.table({"task_index": [0, 1], "task": ["pick the cup", "open the drawer"]}),
                   root / "meta" / "tasks.parquet")
    rows, episodes, start = [], [], 0
    for e, n in enumerate(lengths):
        episode = {"episode_index": e, "length": n, "dataset_from_index": start,
                   "dataset_to_index": start + n, "data/chunk_index": 0, "data/file_index": 0,
                   "tasks": [["pick the cup", "open the drawer"][e]]}
        for cam in CAMERAS:
            episode |= {f"videos/{cam}/chunk_index": 0, f"videos/{cam}/file_index": 0,
                        f"videos/{cam}/from_timestamp": start / FPS,
                        f"videos/{cam}/to_timestamp": (start + n) / FPS}
        episodes.append(episode)
        for t in range(n):
            rows.append({"index": start + t, "episode_index": e, "frame_index": t,
                         "timestamp": t / FPS, "task_index": e,
                         "observation.state": [float(e), float(t), 1.0],
                         "action": [float(10 * e + t), -float(t)]})
        start += n
    pq.write_table(pa.Table.from_pylist(episodes),
                   root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    (root / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "chunk-000" / "file-000.parquet")
    for c, cam in enumerate(CAMERAS):
        frames = [_shade(c, e, t) for e, n in enumerate(lengths) for t in range(n)]
        _write_video(root / "videos" / cam / "chunk-000" / "file-000.mp4", frames, codec)
    return root


def test_samples_images_actions_and_instructions(tmp_path):
    data = LeRobotDataset(write_dataset(tmp_path), chunk_size=3)
    assert len(data) == sum(LENGTHS) and data.cameras == list(CAMERAS)
    sample = data[LENGTHS[0] + 2]  # episode 1, frame 2
    assert sample["images"].shape == (2, 3, 32, 32) and sample["images"].dtype == torch.uint8
    for c in range(2):
        assert abs(float(sample["images"][c].float().mean()) - _shade(c, 1, 2)) < 4
    assert sample["instruction"] == "open the drawer"
    assert torch.equal(sample["proprio"], torch.tensor([1.0, 2.0, 1.0]))
    # frames 2, 3 and (past the end) 3 again
    assert torch.equal(sample["actions"], torch.tensor([[12.0, -2.0], [13.0, -3.0],
                                                        [13.0, -3.0]]))
    first = data[0]
    assert abs(float(first["images"][0].float().mean()) - _shade(0, 0, 0)) < 4


def test_a_chunk_that_crosses_an_episode_end_carries_the_pad_mask(tmp_path):
    # LeRobot's action_is_pad: step k of a chunk from frame t of an n-frame episode is
    # padding when t + k >= n (the action there repeats the episode's last one)
    data = LeRobotDataset(write_dataset(tmp_path), chunk_size=3)
    for episode, n in enumerate(LENGTHS):
        for t in range(n):
            sample = data[sum(LENGTHS[:episode]) + t]
            want = torch.tensor([t + k >= n for k in range(3)])
            assert sample["action_is_pad"].dtype == torch.bool
            assert torch.equal(sample["action_is_pad"], want), (episode, t)
            last = torch.tensor([10.0 * episode + n - 1, -(n - 1.0)])
            assert all(torch.equal(sample["actions"][k], last) for k in range(3) if want[k])
    # episode 0 has 5 frames: frame 3's chunk is frames 3, 4 and a repeat of 4
    assert data[3]["action_is_pad"].tolist() == [False, False, True]
    assert data[4]["action_is_pad"].tolist() == [False, True, True]


@pytest.mark.parametrize("codec", ["libsvtav1", "libx264", "libx265", "libvpx-vp9"])
def test_the_codecs_lerobot_writes_are_decoded(tmp_path, codec):
    """AV1 (LeRobot's default encoder, libsvtav1), H.264, HEVC and VP9 in mp4 (MPEG-4 part 2
    is every other test's): each camera's frame t of each episode."""
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # a PyAV build without this encoder: nothing to write the test with
        pytest.skip(f"this PyAV has no {codec} encoder")
    data = LeRobotDataset(write_dataset(tmp_path, codec=codec))
    for i, (e, t) in enumerate((e, t) for e, n in enumerate(LENGTHS) for t in range(n)):
        images = data[i]["images"]
        for c in range(len(CAMERAS)):
            assert abs(float(images[c].float().mean()) - _shade(c, e, t)) < 4, (codec, c, e, t)


def test_statistics_are_computed_or_read(tmp_path):
    data = LeRobotDataset(write_dataset(tmp_path))
    stats = data.statistics()[tmp_path.name]
    actions = torch.tensor([[10.0 * e + t, -t] for e, n in enumerate(LENGTHS)
                            for t in range(n)], dtype=torch.float64)
    assert stats["action"]["max"] == actions.amax(0).tolist()
    # the population deviation, as LeRobot's compute_stats and vlakit's writer
    torch.testing.assert_close(torch.tensor(stats["action"]["std"], dtype=torch.float64),
                               actions.std(0, correction=0))
    torch.testing.assert_close(torch.tensor(stats["action"]["q01"], dtype=torch.float64),
                               torch.quantile(actions, 0.01, dim=0))
    (tmp_path / "meta" / "stats.json").write_text(json.dumps(
        {"action": {"q01": [-1.0, -1.0], "q99": [1.0, 1.0]},
         "observation.state": {"q01": [0.0] * 3, "q99": [1.0] * 3}}))
    assert LeRobotDataset(tmp_path).statistics()[tmp_path.name]["action"]["q99"] == [1.0, 1.0]


def test_collate_through_a_processor_and_the_model_check(tmp_path):
    from vlakit import VLA
    from vlakit.core import BidirectionalMask
    from vlakit.decoders import llama
    from vlakit.heads import L1RegressionHead
    from vlakit.interleave import PrefixInterleaver
    from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer
    from vlakit.projectors import LinearProjector, ProprioProjector
    from vlakit.vision import vit

    data = LeRobotDataset(write_dataset(tmp_path), chunk_size=2)
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *data.tasks.values()])
    model = VLA(vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=2, mlp_dim=64),
                LinearProjector(32, 64), PrefixInterleaver(1, 2),
                llama(vocab_size=len(tokenizer), dim=64, num_layers=1, num_heads=4,
                      mlp_dim=128), BidirectionalMask(),
                head=L1RegressionHead(64, action_dim=2, chunk_size=2),
                proprio_projector=ProprioProjector(3, 64))
    data.check_model(model)
    processor = OpenVLAProcessor.from_model(tokenizer, model)
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate_with(processor))
    batch = next(iter(loader))
    assert batch.pixels.shape[:2] == (3, 2) and batch.actions.shape == (3, 2, 2)
    assert torch.equal(batch.action_is_pad, torch.zeros(3, 2, dtype=torch.bool))
    assert torch.isfinite(model(batch).loss)
    wrong = VLA(**{**model.__dict__["_recorded_init"][1],
                   "head": L1RegressionHead(64, action_dim=7, chunk_size=2)})
    with pytest.raises(ValueError, match="actions have 2 dimensions but the model's head "
                                         "predicts 7"):
        data.check_model(wrong)
    memory = InMemoryDataset([data[0], data[1]])
    assert len(memory) == 2 and memory[1]["frame"] == 1


def _tiny_model(tokenizer, chunk_size=2, head=None):
    from vlakit import VLA
    from vlakit.core import BidirectionalMask
    from vlakit.decoders import llama
    from vlakit.heads import L1RegressionHead
    from vlakit.interleave import PrefixInterleaver
    from vlakit.projectors import LinearProjector, ProprioProjector
    from vlakit.vision import vit

    torch.manual_seed(0)
    return VLA(vit(img_size=28, patch_size=14, dim=32, depth=1, num_heads=2, mlp_dim=64),
               LinearProjector(32, 64), PrefixInterleaver(1, 2),
               llama(vocab_size=len(tokenizer), dim=64, num_layers=1, num_heads=4,
                     mlp_dim=128), BidirectionalMask(),
               head=head or L1RegressionHead(64, action_dim=2, chunk_size=chunk_size),
               proprio_projector=ProprioProjector(3, 64))


def test_the_collate_hands_the_pad_mask_to_the_processor_and_the_loss(tmp_path):
    from vlakit.processors import OPENVLA_PROMPT, OpenVLAProcessor, word_tokenizer

    data = LeRobotDataset(write_dataset(tmp_path), chunk_size=2)
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *data.tasks.values()])
    model = _tiny_model(tokenizer).train()
    collate = collate_with(OpenVLAProcessor.from_model(tokenizer, model))
    samples = [data[3], data[4], data[LENGTHS[0] + 3]]  # the last frames of both episodes
    batch = collate(samples)
    assert batch.action_is_pad.tolist() == [[False, False], [False, True], [False, True]]
    # the padded steps are no targets: changing their actions leaves the loss as it is
    loss = model(batch).loss
    for s in samples:
        s["actions"] = s["actions"].clone()
        s["actions"][s["action_is_pad"]] = 99.0
    torch.testing.assert_close(model(collate(samples)).loss, loss, rtol=0, atol=0)
    # samples of your own without the mask: no mask, every step a target
    own = [{k: v for k, v in s.items() if k != "action_is_pad"} for s in samples]
    memory = InMemoryDataset(own)
    assert collate([memory[0], memory[1]]).action_is_pad is None
    with pytest.raises(ValueError, match="sample 1 of the batch has no 'action_is_pad' but "
                                         "sample 0 has one"):
        collate([samples[0], own[1]])


def test_the_model_check_names_the_chunk_sizes(tmp_path):
    from vlakit.actions import ActionTokenizer
    from vlakit.heads import DiscreteActionHead, FlowMatchingHead
    from vlakit.processors import OPENVLA_PROMPT, word_tokenizer

    data = LeRobotDataset(write_dataset(tmp_path), chunk_size=2)
    tokenizer = word_tokenizer([OPENVLA_PROMPT, *data.tasks.values()])
    with pytest.raises(ValueError, match=r"the dataset yields chunks of 2 actions \(chunk_size="
                                         r"2\) but the model's head predicts chunks of 4; make "
                                         r"the dataset with chunk_size=4"):
        data.check_model(_tiny_model(tokenizer, chunk_size=4))
    flow = FlowMatchingHead(64, action_dim=2, chunk_size=3)
    with pytest.raises(ValueError, match="predicts chunks of 3"):
        data.check_model(_tiny_model(tokenizer, head=flow))
    tokens = DiscreteActionHead(ActionTokenizer(vocab_end=len(tokenizer), action_dim=2,
                                                num_bins=8),
                                chunk_size=1)
    with pytest.raises(ValueError, match="predicts chunks of 1"):
        data.check_model(_tiny_model(tokenizer, head=tokens))
    data.check_model(_tiny_model(tokenizer, head=FlowMatchingHead(64, action_dim=2,
                                                                  chunk_size=2)))


def test_folder_problems_fail_when_the_dataset_is_made(tmp_path):
    root = write_dataset(tmp_path / "a")
    (root / "data" / "chunk-000" / "file-000.parquet").unlink()
    with pytest.raises(DatasetError, match="episode 0's data file .*file-000.parquet is missing"):
        LeRobotDataset(root)
    root = write_dataset(tmp_path / "b")
    (root / "videos" / CAMERAS[1] / "chunk-000" / "file-000.mp4").unlink()
    with pytest.raises(DatasetError, match=f"camera '{CAMERAS[1]}' has no frames"):
        LeRobotDataset(root)
    assert LeRobotDataset(root, cameras=[CAMERAS[0]]).cameras == [CAMERAS[0]]
    with pytest.raises(DatasetError, match="camera 'observation.images.side' is not"):
        LeRobotDataset(root, cameras=["observation.images.side"])
    with pytest.raises(DatasetError, match="no meta/info.json"):
        LeRobotDataset(tmp_path / "nothing")
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.images.side"] = {"dtype": "image", "shape": [32, 32, 3]}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="camera 'observation.images.side' is an image "
                                           "feature .* leave it out with cameras="):
        LeRobotDataset(root)
