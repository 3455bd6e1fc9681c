"""File playback: 201 + Location, Started/Finished timing, what the caller hears, stop, queueing."""

from __future__ import annotations

import wave
from pathlib import Path

import pytest_twisted

from tests.sim.client import Ari, Events, open_rtp_peer, sleep, wait_until
from tests.sim.test_calls import answered_call
from tests.sim.test_rtp_media import media_call, send_stream, tone
from twisted_agent.media import rtp
from twisted_agent.media.codecs import ulaw_decode, ulaw_encode
from twisted_agent.sim import AsteriskSimulator


def write_clip(directory: Path, name: str, seconds: float, ext: str = ".ulaw", freq: float = 440.0) -> str:
    base = directory / name
    pcm = tone(seconds, freq=freq)
    if ext == ".wav":
        with wave.open(str(base) + ext, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(pcm)
    else:
        (directory / (name + ext)).write_bytes(ulaw_encode(pcm))
    return str(base)


@pytest_twisted.ensureDeferred
async def test_playback_is_heard_and_finishes_after_the_clip(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                             tmp_path: Path) -> None:
    clip = write_clip(tmp_path, "greeting", 0.3)
    caller = await answered_call(sim, ari, events)
    posted_at = sim.reactor.seconds()
    response = await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{clip}")
    assert response.code == 201
    playback = response.json()
    assert response.header("Location") == f"/ari/playbacks/{playback['id']}"
    assert playback["state"] == "queued"
    assert playback["media_uri"] == f"sound:{clip}"
    assert playback["target_uri"] == f"channel:{caller.channel_id}"
    started = await events.expect("PlaybackStarted")
    assert started["playback"]["state"] == "playing"
    assert events.time_of(started) - posted_at >= 0.001  # started after the POST, never before
    assert (await ari.get(f"/playbacks/{playback['id']}")).json()["state"] == "playing"
    finished = await events.expect("PlaybackFinished")
    assert finished["playback"]["state"] == "done"
    took = events.time_of(finished) - events.time_of(started)
    assert took > 0.28  # played in real time, not all at once (the audio's own length is checked below)
    assert (await ari.get(f"/playbacks/{playback['id']}")).code == 404

    [(start, end, source)] = caller.heard_segments()
    assert source == f"playback:{playback['id']}"
    assert abs((end - start) - 0.3) < 0.001
    begin = round(start * 8000) * 2
    expected = ulaw_decode((tmp_path / "greeting.ulaw").read_bytes())
    assert caller.heard()[begin:begin + len(expected)] == expected
    await caller.hangup()
    caller.write_wav(str(tmp_path / "heard.wav"))
    with wave.open(str(tmp_path / "heard.wav"), "rb") as recording:
        assert (recording.getframerate(), recording.getnchannels(), recording.getsampwidth()) == (8000, 1, 2)
        assert recording.readframes(recording.getnframes()) == caller.heard()


@pytest_twisted.ensureDeferred
async def test_wav_is_used_when_there_is_no_ulaw(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                 tmp_path: Path) -> None:
    write_clip(tmp_path, "both", 0.1, ".wav", freq=300)
    clip = write_clip(tmp_path, "both", 0.06, ".ulaw", freq=600)
    only_wav = write_clip(tmp_path, "only", 0.1, ".wav")
    caller = await answered_call(sim, ari, events)
    await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{clip}")
    await events.expect("PlaybackFinished")
    await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{only_wav}")
    await events.expect("PlaybackFinished")
    lengths = [round(end - start, 2) for start, end, _ in caller.heard_segments()]
    assert lengths == [0.06, 0.1], "the .ulaw file wins on a μ-law channel"


@pytest_twisted.ensureDeferred
async def test_missing_file_fails_quickly(sim: AsteriskSimulator, ari: Ari, events: Events,
                                          tmp_path: Path) -> None:
    caller = await answered_call(sim, ari, events)
    await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{tmp_path}/nothing")
    started = await events.expect("PlaybackStarted")
    finished = await events.expect("PlaybackFinished")
    assert finished["playback"]["state"] == "failed" and finished["playback"]["id"] == started["playback"]["id"]
    assert caller.heard_segments() == []  # failed at once: nothing was played


@pytest_twisted.ensureDeferred
async def test_plays_on_one_channel_queue_and_a_list_continues(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                               tmp_path: Path) -> None:
    one = write_clip(tmp_path, "one", 0.1)
    two = write_clip(tmp_path, "two", 0.06)
    caller = await answered_call(sim, ari, events)
    first = (await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{one},sound:{two}")).json()
    assert first["next_media_uri"] == f"sound:{two}"
    second = (await ari.post(f"/channels/{caller.channel_id}/play/second-one", media=f"sound:{one}")).json()
    assert second["id"] == "second-one"
    await events.expect("PlaybackFinished", playback__id="second-one", timeout=3)
    sequence = [(e["type"], e["playback"]["id"], e["playback"]["media_uri"]) for e in events.events
                if e["type"].startswith("Playback")]
    assert sequence == [
        ("PlaybackStarted", first["id"], f"sound:{one}"),
        ("PlaybackContinuing", first["id"], f"sound:{one}"),
        ("PlaybackStarted", first["id"], f"sound:{two}"),
        ("PlaybackFinished", first["id"], f"sound:{two}"),
        ("PlaybackStarted", "second-one", f"sound:{one}"),
        ("PlaybackFinished", "second-one", f"sound:{one}"),
    ]
    starts = [start for start, _, _ in caller.heard_segments()]
    # (to the 10 ms: 0.12 - 0.02 is 0.0999... in floating point)
    assert round(starts[1] - starts[0], 2) >= 0.1 and round(starts[2] - starts[1], 2) >= 0.06


@pytest_twisted.ensureDeferred
async def test_delete_stops_a_playing_file_and_cancels_a_queued_one(sim: AsteriskSimulator, ari: Ari,
                                                                    events: Events, tmp_path: Path) -> None:
    long = write_clip(tmp_path, "long", 2.0)
    caller = await answered_call(sim, ari, events)
    playing = (await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{long}")).json()
    queued = (await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{long}")).json()
    await events.expect("PlaybackStarted")
    await sleep(0.1)
    assert (await ari.delete(f"/playbacks/{queued['id']}")).code == 204
    stopped_at = sim.reactor.seconds()
    assert (await ari.delete(f"/playbacks/{playing['id']}")).code == 204
    done = await events.expect("PlaybackFinished", playback__id=playing["id"])
    assert done["playback"]["state"] == "done"
    assert events.time_of(done) - stopped_at < 0.03
    cancelled = await events.expect("PlaybackFinished", playback__id=queued["id"])
    assert cancelled["playback"]["state"] == "done"
    assert [e["type"] for e in events.events if e.get("playback", {}).get("id") == queued["id"]] == [
        "PlaybackFinished"]
    [(start, end, _)] = caller.heard_segments()
    assert 0.08 < end - start < 0.2
    assert (await ari.delete(f"/playbacks/{playing['id']}")).code == 404


@pytest_twisted.ensureDeferred
async def test_caller_hangup_mid_playback_finishes_it_failed(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                             tmp_path: Path) -> None:
    long = write_clip(tmp_path, "long", 2.0)
    caller = await answered_call(sim, ari, events)
    await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{long}")
    await events.expect("PlaybackStarted")
    await caller.hangup()
    finished = await events.expect("PlaybackFinished")
    assert finished["playback"]["state"] == "failed"
    await events.expect("ChannelDestroyed")
    types = events.types()
    assert types[types.index("ChannelHangupRequest"):] == [
        "ChannelHangupRequest", "PlaybackFinished", "StasisEnd", "ChannelDestroyed"]


@pytest_twisted.ensureDeferred
async def test_a_bridged_caller_is_suspended_from_the_bridge_while_a_file_plays(
        sim: AsteriskSimulator, ari: Ari, events: Events, tmp_path: Path) -> None:
    clip = write_clip(tmp_path, "prompt", 0.3)
    peer = open_rtp_peer()
    try:
        caller, media, port = await media_call(sim, ari, events, peer)
        await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{clip}")
        await events.expect("PlaybackStarted")
        await caller.say(tone(0.1))
        await send_stream(peer, port, 3)
        assert peer.received == [], "the caller's speech does not reach the media leg during the file"
        await events.expect("PlaybackFinished")
        assert [source for _, _, source in caller.heard_segments()] == [
            f"playback:{events.events[-1]['playback']['id']}"]
        await caller.say(tone(0.04))
        await wait_until(lambda: len(peer.received) == 2)
        await send_stream(peer, port, 2, first_sequence=500)
        await sleep(0.02)
        assert [source for _, _, source in caller.heard_segments()][-1] == "rtp"
        assert rtp.parse(peer.received[0][1]).payload_type == 0
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_unsupported_scheme_is_skipped_without_a_final_update(sim: AsteriskSimulator, ari: Ari,
                                                                    events: Events, tmp_path: Path) -> None:
    clip = write_clip(tmp_path, "after", 0.04)
    caller = await answered_call(sim, ari, events)
    playback = (await ari.post(f"/channels/{caller.channel_id}/play", media=f"http://x/y,sound:{clip}")).json()
    await events.expect("PlaybackStarted", playback__media_uri="http://x/y")
    await events.expect("PlaybackStarted", playback__media_uri=f"sound:{clip}")
    finished = await events.expect("PlaybackFinished")
    assert finished["playback"]["id"] == playback["id"]
    assert "PlaybackContinuing" not in events.types()


@pytest_twisted.ensureDeferred
async def test_a_lone_unsupported_uri_never_finishes_as_in_asterisk(sim: AsteriskSimulator, ari: Ari,
                                                                     events: Events) -> None:
    caller = await answered_call(sim, ari, events)
    playback = (await ari.post(f"/channels/{caller.channel_id}/play", media="http://example.com/x.wav")).json()
    await events.expect("PlaybackStarted")
    await sleep(0.1)
    assert "PlaybackFinished" not in events.types()
    assert (await ari.get(f"/playbacks/{playback['id']}")).code == 404


@pytest_twisted.ensureDeferred
async def test_play_errors(sim: AsteriskSimulator, ari: Ari, events: Events) -> None:
    caller = sim.originate("ai-agent")
    await events.expect("StasisStart")
    assert (await ari.post("/channels/1.2/play", media="sound:x")).code == 404
    assert (await ari.post(f"/channels/{caller.channel_id}/play", media="sound:x", skipms="-1")).code == 400
    assert (await ari.get("/playbacks/nope")).json() == {"message": "Playback not found"}
    assert (await ari.delete("/playbacks/nope")).code == 404


@pytest_twisted.ensureDeferred
async def test_offsetms_starts_the_first_item_that_far_in(sim: AsteriskSimulator, ari: Ari, events: Events,
                                                          tmp_path: Path) -> None:
    clip = write_clip(tmp_path, "reply", 0.5, freq=500)
    second = write_clip(tmp_path, "after", 0.1, freq=700)
    caller = await answered_call(sim, ari, events)
    await ari.post(f"/channels/{caller.channel_id}/play", media=f"sound:{clip},sound:{second}", offsetms="200")
    await events.expect("PlaybackStarted")
    finished = await events.expect("PlaybackFinished")
    assert finished["playback"]["state"] == "done"
    segments = caller.heard_segments()
    lengths = [round(end - start, 2) for start, end, _ in segments]
    assert lengths == [0.3, 0.1], "the first from 200 ms on, then all of the second"
    begin = round(segments[0][0] * 8000) * 2
    whole = ulaw_decode((tmp_path / "reply.ulaw").read_bytes())
    assert caller.heard()[begin:begin + 4800] == whole[3200:8000]
    await caller.hangup()
