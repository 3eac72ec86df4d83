// A wafer client on a second, independent gRPC stack (grpc-js, protos loaded at runtime by
// proto-loader), run by tests/test_server_node.py:
//
//   node client.mjs <host:port> <scenario>
//
// It prints one JSON line per call, {"call", "messages", "code", "details", "trailers", "ms"},
// and leaves every assertion to the Python side. Every call has a deadline and a watchdog ends
// the process, so a hung server shows as a failed test, never a hung one.
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const [address, scenario] = process.argv.slice(2);
const CALL_MS = 20000;
const WATCHDOG_MS = 25000;

const protos = [
  fileURLToPath(new URL('../../protos/wafer.proto', import.meta.url)),
  fileURLToPath(new URL('./health.proto', import.meta.url)),
];
// keepCase: the proto's own field names; oneofs: a virtual `kind` / `input` naming the member set
const definition = protoLoader.loadSync(protos, {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const loaded = grpc.loadPackageDefinition(definition);
const wafer = new loaded.wafer.v1.Wafer(address, grpc.credentials.createInsecure());
const health = new loaded.grpc.health.v1.Health(address, grpc.credentials.createInsecure());

const deadline = (ms = CALL_MS) => new Date(Date.now() + ms);
const codeName = (code) => grpc.status[code] ?? String(code);

function report(call, result) {
  process.stdout.write(JSON.stringify({ call, ...result }) + '\n');
}

// Every message of a streaming call, then its status (code name, details, trailing metadata).
// onMessage(message, call) may write to a bidirectional call or cancel it.
function collect(call, onMessage = () => {}) {
  const started = Date.now();
  const messages = [];
  return new Promise((resolve) => {
    let status = null;
    let ended = false;
    const finish = () => {
      if (status === null || !ended) return;
      resolve({ messages, code: codeName(status.code), details: status.details,
                trailers: status.metadata.getMap(), ms: Date.now() - started });
    };
    call.on('data', (m) => { messages.push(m); onMessage(m, call); });
    call.on('end', () => { ended = true; finish(); });
    call.on('error', () => { ended = true; finish(); });  // the status carries the code
    call.on('status', (s) => { status = s; finish(); });
  });
}

function unary(client, method, request) {
  const started = Date.now();
  return new Promise((resolve) => {
    client[method](request, { deadline: deadline() }, (err, response) => {
      resolve(err
        ? { messages: [], code: codeName(err.code), details: err.details, trailers: err.metadata?.getMap() ?? {},
            ms: Date.now() - started }
        : { messages: [response], code: 'OK', details: '', trailers: {}, ms: Date.now() - started });
    });
  });
}

const greedy = (max_tokens, extra = {}) => ({ temperature: 0, max_tokens, ...extra });
const generate = (request, ms) => wafer.Generate(request, { deadline: deadline(ms) });

// ------------------------------------------------------------------------- scenarios

const scenarios = {
  // A greedy stream, coalesced and not, and the model's description.
  async generate() {
    report('model', await unary(wafer, 'GetModel', { name: '' }));
    report('generate', await collect(generate({ text: 'hello world', sampling: greedy(24) })));
    report('coalesced', await collect(generate({ text: 'hello world', coalesce_tokens: 5,
                                                 sampling: greedy(23) })));
  },

  // Two chat turns, each sent once the previous one's Final arrived, then CloseSession; the
  // client never half-closes: the server ends the stream.
  async session() {
    const call = wafer.Session({ deadline: deadline() });
    const turn = (turn_id, content) => ({ turn: { turn_id, messages: { messages: [{ role: 'user', content }] },
                                                  sampling: greedy(12) } });
    const done = collect(call, (m) => {
      if (m.kind === 'opened') call.write(turn('t1', 'tell me about the sea'));
      else if (m.kind === 'final' && m.turn_id === 't1') call.write(turn('t2', 'and the sky'));
      else if (m.kind === 'final' && m.turn_id === 't2') call.write({ close: {} });
    });
    call.write({ open: {} });
    report('session', await done);
  },

  // Out-of-range fields: a Generate is refused with a status, a session's turn with a TurnError
  // (the session goes on).
  async invalid() {
    report('temperature', await collect(generate({ text: 'hi', sampling: { temperature: 150 } })));
    report('max_tokens', await collect(generate({ text: 'hi', sampling: { max_tokens: 100000 } })));
    report('unknown_model', await collect(generate({ model: 'no-such-model', text: 'hi' })));
    const call = wafer.Session({ deadline: deadline() });
    const done = collect(call, (m) => {
      if (m.kind === 'opened') {
        call.write({ turn: { turn_id: 'bad', text: 'hi', sampling: { top_p: 2 } } });
        call.write({ turn: { turn_id: 'good', text: 'hi', sampling: greedy(3) } });
      } else if (m.kind === 'final') {
        call.write({ close: {} });
      }
    });
    call.write({ open: {} });
    report('session_turn', await done);
  },

  // Trailing metadata of a deprecated model, and a retired model's refusal.
  async lifecycle() {
    report('deprecated', await collect(generate({ model: 'tiny-2024', text: 'hi', sampling: greedy(2) })));
    report('retired', await collect(generate({ model: 'tiny-2020', text: 'hi', sampling: greedy(2) })));
  },

  // Calls that end early: a deadline, a cancel after 3 chunks, a session cancelled mid-turn.
  async abort() {
    const model = await unary(wafer, 'GetModel', { name: '' });
    const long = greedy(model.messages[0].context_length - 16);
    report('deadline', await collect(generate({ text: 'deadline', sampling: long }, 150)));
    const cancelAfter3 = (m, call) => {
      if (m.kind === 'chunk' && ++cancelAfter3.seen[call.label] === 3) call.cancel();
    };
    cancelAfter3.seen = { generate: 0, session: 0 };
    const gen = generate({ text: 'cancel me', sampling: long });
    gen.label = 'generate';
    report('cancel_generate', await collect(gen, cancelAfter3));
    const session = wafer.Session({ deadline: deadline() });
    session.label = 'session';
    const done = collect(session, (m, call) => {
      if (m.kind === 'opened') call.write({ turn: { turn_id: 'long', text: 'cancel me too', sampling: long } });
      else cancelAfter3(m, call);
    });
    session.write({ open: {} });
    report('cancel_session', await done);
  },

  async health() {
    report('health', await unary(health, 'Check', { service: 'wafer.v1.Wafer' }));
    report('health_server', await unary(health, 'Check', { service: '' }));
  },
};

if (!(scenario in scenarios)) {
  process.stderr.write(`usage: node client.mjs <host:port> <${Object.keys(scenarios).join('|')}>\n`);
  process.exit(2);
}
setTimeout(() => {
  process.stderr.write(`watchdog: scenario ${scenario} still running after ${WATCHDOG_MS} ms\n`);
  process.exit(3);
}, WATCHDOG_MS).unref();
try {
  await scenarios[scenario]();
} finally {
  wafer.close();
  health.close();
}
