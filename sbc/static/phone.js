// The SBC's browser softphone: sip.js over a WebSocket to the page's own origin.
//
// The page talks to no other host: SIP goes to ws(s)://<this host>/ (the SBC's listener that
// served the page), there are no STUN/TURN servers, and the media goes to whatever address
// the SBC puts in its SDP. Tests drive it through `window.phone` (below).
import {
  Inviter,
  Registerer,
  RegistererState,
  SessionState,
  UserAgent,
} from "./vendor/sip.js/lib/api/index.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const MAX_LOG = 1000; // lines kept in `phone.log` and on the page

// A steady test tone is not speech: the browser's voice processing would remove it.
const AUDIO = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };
const SDH_OPTIONS = { constraints: { audio: AUDIO, video: false } };

// ?codecs=opus (encoding names, comma-separated; tests): the page's audio keeps only these
// codecs and telephone-event, in the offers it makes and in those it answers. sip.js runs
// its modifiers on the local description before it is set and on the remote one, so an
// answer can only pick from what is left. Without the parameter nothing is changed.
const CODECS = (params.get("codecs") ?? "").toLowerCase().split(",").filter(Boolean);
const STATIC_PTS = { 0: "pcmu", 8: "pcma", 9: "g722" }; // RFC 3551: need no a=rtpmap
const MODIFIERS = CODECS.length ? [onlyCodecs] : [];

let userAgent = null;
let registerer = null;
let session = null; // the one call: an Inviter (outgoing) or an Invitation (incoming)
let audioContext = null;
let source = null; // the remote stream in WebAudio
let analyser = null; // measures it: level() and tone()
let metering = false; // meterLoop() is scheduled

// -- state for people (the status line) and for tests (window.phone) ----------------------
const phone = {
  registered: false,
  state: "idle", // idle | calling | ringing | incall | ended
  peer: null, // the other party's SIP URI (as text) in the current or last call
  lastError: null,
  log: [],
  call: (target) => call(target),
  answer: () => answer(),
  hangup: () => hangup(),
  level: () => level(),
  tone: () => tone(),
  register: () => register(),
  // Measure another stream with level() and tone() (tests check the meters on a local call).
  listen: (stream) => listen(stream),
  stats: () => stats(),
  // The call's SDP as the peer connection holds it (after the modifiers), for tests.
  sdp: () => ({
    local: session?.sessionDescriptionHandler?.peerConnection?.localDescription?.sdp ?? null,
    remote: session?.sessionDescriptionHandler?.peerConnection?.remoteDescription?.sdp ?? null,
  }),
  // Close the SIP WebSocket now, calls or not: the SBC loses the flow (tests).
  disconnect: () => userAgent?.transport.disconnect(),
};
window.phone = phone;

function log(text) {
  const line = `${new Date().toISOString().slice(11, 23)} ${text}`;
  phone.log.push(line);
  if (phone.log.length > MAX_LOG) phone.log.splice(0, phone.log.length - MAX_LOG);
  const area = $("log");
  area.textContent = phone.log.slice(-200).join("\n");
  area.scrollTop = area.scrollHeight;
}

function fail(what, error) {
  phone.lastError = `${what}: ${error?.message ?? error}`;
  log(`ERROR ${phone.lastError}`);
  render();
}

function setState(state) {
  if (phone.state !== state) log(`call state ${phone.state} -> ${state}`);
  phone.state = state;
  render();
}

// The status line and which buttons make sense now.
function render() {
  const peer = phone.peer ? phone.peer.replace(/^sips?:/, "") : "";
  const words = {
    idle: phone.registered ? "Registered, idle" : "Not registered",
    calling: `Calling ${peer}…`,
    ringing: `Incoming call from ${peer}`,
    incall: `In call with ${peer}`,
    ended: `Call with ${peer} ended`,
  };
  const status = $("status");
  status.dataset.state = phone.state;
  status.textContent = words[phone.state] + (phone.lastError ? ` (last error: ${phone.lastError})` : "");
  const busy = phone.state === "calling" || phone.state === "ringing" || phone.state === "incall";
  $("call").disabled = busy || !userAgent;
  $("answer").disabled = phone.state !== "ringing";
  $("hangup").disabled = !busy;
}

// -- the user agent -------------------------------------------------------------------------
function domain() {
  return $("domain").value.trim() || location.hostname;
}

function targetUri(target) {
  const text = String(target).trim();
  return UserAgent.makeURI(text.startsWith("sip:") || text.startsWith("sips:") ? text : `sip:${text}@${domain()}`);
}

// ws:// next to an http page, wss:// next to an https one: the same origin either way.
function server() {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/`;
}

async function register() {
  const user = $("user").value.trim();
  if (!user) return fail("register", "no user name");
  const password = $("password").value;
  const uri = UserAgent.makeURI(`sip:${user}@${domain()}`);
  if (!uri) return fail("register", `not a SIP URI: sip:${user}@${domain()}`);
  try {
    if (userAgent) await userAgent.stop(); // a new account replaces the old one
  } catch (error) {
    log(`stopping the old user agent: ${error}`);
  }
  phone.registered = false;
  phone.lastError = null;
  userAgent = new UserAgent({
    uri,
    transportOptions: { server: server() },
    authorizationUsername: password ? user : undefined,
    authorizationPassword: password || undefined,
    // No STUN server (sip.js defaults to a public one): the SBC is ICE-lite and reachable.
    sessionDescriptionHandlerFactoryOptions: {
      peerConnectionConfiguration: { iceServers: [] },
      iceGatheringTimeout: 2000,
    },
    logBuiltinEnabled: false,
    logConfiguration: false,
    logLevel: "debug",
    logConnector: (level, category, label, content) => {
      if (level !== "debug" || category === "sip.Transport") log(`${level} ${category} ${content}`);
    },
    delegate: {
      onInvite: (invitation) => incoming(invitation),
      onDisconnect: (error) => {
        phone.registered = false;
        if (error) fail("transport", error);
        render();
      },
      onConnect: () => log(`connected to ${server()}`),
    },
  });
  registerer = new Registerer(userAgent);
  registerer.stateChange.addListener((state) => {
    log(`registration ${state}`);
    phone.registered = state === RegistererState.Registered;
    render();
  });
  try {
    await userAgent.start();
    await registerer.register({
      requestDelegate: {
        onReject: (response) => fail("register", `${response.message.statusCode} ${response.message.reasonPhrase}`),
      },
    });
  } catch (error) {
    fail("register", error);
  }
  render();
}

// -- calls ------------------------------------------------------------------------------------
function follow(current) {
  current.stateChange.addListener((state) => {
    log(`session ${state}`);
    if (state === SessionState.Established) {
      setState("incall");
      listen(current.sessionDescriptionHandler?.remoteMediaStream);
    } else if (state === SessionState.Terminated) {
      if (session === current) session = null;
      detachRemoteAudio();
      setState("ended");
    }
  });
}

async function call(target) {
  if (!userAgent) return fail("call", "register first");
  if (session) return fail("call", "a call is already up");
  if (target !== undefined) $("target").value = String(target);
  const uri = targetUri($("target").value);
  if (!uri) return fail("call", `not a SIP URI: ${$("target").value}`);
  phone.peer = uri.toString();
  const inviter = new Inviter(userAgent, uri, {
    sessionDescriptionHandlerOptions: SDH_OPTIONS,
    sessionDescriptionHandlerModifiers: MODIFIERS,
  });
  session = inviter;
  follow(inviter);
  phone.lastError = null;
  setState("calling");
  log(`calling ${uri}`);
  try {
    await inviter.invite({
      requestDelegate: {
        onReject: (response) => fail("call", `${response.message.statusCode} ${response.message.reasonPhrase}`),
      },
    });
  } catch (error) {
    fail("call", error);
  }
}

function incoming(invitation) {
  if (session) {
    invitation.reject({ statusCode: 486 }); // one call at a time
    return;
  }
  session = invitation;
  phone.peer = invitation.remoteIdentity.uri.toString();
  follow(invitation);
  log(`incoming call from ${invitation.remoteIdentity.uri}`);
  setState("ringing");
  if (params.get("autoanswer") === "1") answer();
}

async function answer() {
  if (!session || phone.state !== "ringing") return fail("answer", "no incoming call");
  try {
    await session.accept({
      sessionDescriptionHandlerOptions: SDH_OPTIONS,
      sessionDescriptionHandlerModifiers: MODIFIERS,
    });
  } catch (error) {
    fail("answer", error);
  }
}

async function hangup() {
  const current = session;
  if (!current) return;
  try {
    if (current.state === SessionState.Established) await current.bye();
    else if (current instanceof Inviter) await current.cancel();
    else await current.reject();
  } catch (error) {
    fail("hangup", error);
  }
}

// The ?codecs= filter (a sip.js modifier): in each m=audio section, the payload types whose
// encoding is neither one of CODECS nor telephone-event leave the m-line, with their
// a=rtpmap, a=fmtp and a=rtcp-fb lines.
function onlyCodecs(description) {
  const lines = description.sdp.split(/\r?\n/);
  const names = new Map(Object.entries(STATIC_PTS)); // payload type -> encoding name
  let audio = false;
  for (const line of lines) {
    if (line.startsWith("m=")) audio = line.startsWith("m=audio ");
    const rtpmap = audio && /^a=rtpmap:(\d+) ([^/\s]+)/.exec(line);
    if (rtpmap) names.set(rtpmap[1], rtpmap[2].toLowerCase());
  }
  const keep = (pt) => CODECS.includes(names.get(pt)) || names.get(pt) === "telephone-event";
  const out = [];
  audio = false;
  for (const line of lines) {
    if (line.startsWith("m=")) audio = line.startsWith("m=audio ");
    if (audio && line.startsWith("m=audio ")) {
      const [media, port, proto, ...pts] = line.split(" ");
      out.push([media, port, proto, ...pts.filter(keep)].join(" "));
      continue;
    }
    const attribute = audio && /^a=(?:rtpmap|fmtp|rtcp-fb):(\d+) /.exec(line);
    if (!attribute || keep(attribute[1])) out.push(line);
  }
  return Promise.resolve({ type: description.type, sdp: out.join("\r\n") });
}

// -- remote audio: an <audio> element to hear it, an analyser to measure it ----------------
function listen(stream) {
  if (!stream || stream.getAudioTracks().length === 0) {
    log("no remote audio track");
    return;
  }
  detachRemoteAudio();
  // Chrome feeds WebAudio from a remote WebRTC stream only once a media element plays it.
  const audio = $("remote");
  audio.srcObject = stream;
  audio.play().catch((error) => log(`audio element: ${error}`));
  audioContext = audioContext ?? new AudioContext();
  audioContext.resume().catch(() => {});
  analyser = audioContext.createAnalyser();
  analyser.fftSize = 8192; // 5.9 Hz per bin at 48 kHz
  analyser.smoothingTimeConstant = 0.2;
  source = audioContext.createMediaStreamSource(stream);
  source.connect(analyser);
  if (!metering) meterLoop();
}

function detachRemoteAudio() {
  $("remote").srcObject = null;
  source?.disconnect();
  source = null;
  analyser = null;
}

// RMS of the latest remote samples (0 = silence, about 0.35 for a half-scale sine).
function level() {
  if (!analyser) return 0;
  const samples = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(samples);
  let sum = 0;
  for (const x of samples) sum += x * x;
  return Math.sqrt(sum / samples.length);
}

// The dominant frequency of the remote audio in Hz (0 with no audio), interpolated between
// the loudest bin of the analyser and its neighbours (a parabola through their dB values).
function tone() {
  if (!analyser) return 0;
  const bins = new Float32Array(analyser.frequencyBinCount);
  analyser.getFloatFrequencyData(bins);
  let best = 1;
  for (let i = 2; i < bins.length - 1; i++) if (bins[i] > bins[best]) best = i;
  if (!Number.isFinite(bins[best]) || bins[best] < analyser.minDecibels) return 0;
  const [a, b, c] = [bins[best - 1], bins[best], bins[best + 1]];
  const denominator = a - 2 * b + c;
  const offset = Number.isFinite(denominator) && denominator !== 0 ? (0.5 * (a - c)) / denominator : 0;
  return ((best + offset) * audioContext.sampleRate) / analyser.fftSize;
}

// What the call's peer connection says about its media (a promise; null without a call):
// RTP counts both ways, the ICE pair in use, DTLS state and the SRTP cipher.
async function stats() {
  const pc = session?.sessionDescriptionHandler?.peerConnection;
  if (!pc) return null;
  const report = await pc.getStats();
  const byId = new Map([...report.values()].map((entry) => [entry.id, entry]));
  const result = { packetsSent: 0, packetsReceived: 0, bytesSent: 0, bytesReceived: 0 };
  for (const entry of report.values()) {
    if (entry.type === "outbound-rtp" && entry.kind === "audio") {
      result.packetsSent += entry.packetsSent ?? 0;
      result.bytesSent += entry.bytesSent ?? 0;
    } else if (entry.type === "inbound-rtp" && entry.kind === "audio") {
      result.packetsReceived += entry.packetsReceived ?? 0;
      result.bytesReceived += entry.bytesReceived ?? 0;
      result.codec = byId.get(entry.codecId)?.mimeType;
    } else if (entry.type === "transport") {
      result.dtlsState = entry.dtlsState;
      result.iceState = entry.iceState;
      result.srtpCipher = entry.srtpCipher;
      result.dtlsRole = entry.dtlsRole;
      const pair = byId.get(entry.selectedCandidatePairId);
      const local = pair && byId.get(pair.localCandidateId);
      const remote = pair && byId.get(pair.remoteCandidateId);
      if (local) result.local = `${local.address}:${local.port}/${local.protocol}`;
      if (remote) result.remote = `${remote.address}:${remote.port}/${remote.protocol}`;
    }
  }
  return result;
}

// The meter on the page, four times a second while there is something to measure.
function meterLoop() {
  metering = Boolean(analyser);
  if (!analyser) {
    $("level").value = 0;
    $("tone").textContent = "";
    return;
  }
  $("level").value = level();
  const hz = tone();
  $("tone").textContent = hz ? `${Math.round(hz)} Hz` : "";
  setTimeout(meterLoop, 250);
}

// -- the page -------------------------------------------------------------------------------
$("user").value = params.get("user") ?? "";
$("password").value = params.get("password") ?? "";
$("domain").value = params.get("domain") ?? location.hostname;
$("account").addEventListener("submit", (event) => {
  event.preventDefault();
  register();
});
$("dialer").addEventListener("submit", (event) => {
  event.preventDefault();
  call();
});
$("answer").addEventListener("click", () => answer());
$("hangup").addEventListener("click", () => hangup());
render();
log(`page loaded; SIP server ${server()}`);
if (params.get("autoregister") === "1") register();
