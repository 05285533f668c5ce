'use strict';
// Host app for the npm `smssync` 0.3.28 router (lykmapipo), as described in protocol-notes section 3.2.
// Usage: node server.js PORT [SECRET]   (listens on 127.0.0.1 only; the Sync URL is http://127.0.0.1:PORT/smssync)
// GET /_state answers what the peer received, for the integration tests.

const express = require('express');
const { smssync } = require('smssync');

const port = Number.parseInt(process.argv[2] || '8711', 10);
const secret = process.argv[3] || 'smssync';

// In-memory state: what the router handed to our handlers.
const state = {
  received: [], // SMS synced to us (onReceive)
  outbox: [{ to: '+254700000010', message: 'hello from lykmapipo peer', uuid: 'out-0001' }],
  queued: [], // uuids acknowledged by ?task=sent
  sent_requests: [], // raw uuid lists seen by onSent
  delivered: [], // raw delivery reports seen by onDelivered (undefined → null)
};
let replyCounter = 0;

function onReceive(sms, done) {
  state.received.push(sms);
  if (sms.message === 'fail') {
    return done(new Error('rejected by peer'));
  }
  replyCounter += 1;
  return done(null, { to: sms.from, message: `got: ${sms.message}`, uuid: `reply-${replyCounter}` });
}

function onSend(done) {
  done(null, state.outbox.slice());
}

function onSent(uuids, done) {
  // The router passes body.queued_messages as is: undefined for an empty body, a string for a bad one.
  const list = [].concat(uuids === undefined || uuids === null ? [] : uuids);
  state.sent_requests.push(list);
  for (const uuid of list) {
    const index = state.outbox.findIndex((m) => m.uuid === uuid);
    if (index >= 0) {
      state.outbox.splice(index, 1);
    }
    if (!state.queued.includes(uuid)) {
      state.queued.push(uuid);
    }
  }
  done(null, list);
}

function onQueued(done) {
  done(null, state.queued.slice());
}

function onDelivered(reports, done) {
  state.delivered.push(reports === undefined ? null : reports);
  done(null, reports);
}

const app = express();
app.get('/_state', (request, response) => {
  response.json(state);
});
app.use(
  smssync({
    endpoint: 'smssync',
    secret,
    reply: true,
    error: true,
    onReceive,
    onSend,
    onSent,
    onQueued,
    onDelivered,
  })
);

const server = app.listen(port, '127.0.0.1', () => {
  console.log(`lykmapipo smssync peer listening on http://127.0.0.1:${server.address().port}/smssync`);
});

// Stop cleanly on SIGTERM/SIGINT so the test runner's stop-by-PID is quick.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    // Open keep-alive connections may hold close() back; don't let them.
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
