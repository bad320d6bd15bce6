// The client scenario of tests/e2e/test_node_driver.py, run with the Node.js driver.
//
// Usage: node scenario.mjs INPUT_FILE
//
// INPUT_FILE is canonical Extended JSON written by the Python test (see
// readInput). The connection strings come from the environment so that the
// passwords in them stay out of the process list:
//   CLINICIAN_URI  the proxy, logged in as the clinician (may set compressors=...)
//   BILLING_URI    the proxy, logged in as the billing user
//
// The script runs every step through the proxy and prints one canonical
// Extended JSON document with what each step returned. It checks nothing
// itself: the Python test compares the output with the input. It exits with
// status 1 and a message on stderr when a step fails unexpectedly.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { BSON, MongoClient, MongoServerError } from 'mongodb';

const { EJSON } = BSON;
const DRIVER_VERSION = createRequire(import.meta.url)('mongodb/package.json').version;
const BATCH_SIZE = 2;
// How long one getMore on the change stream waits for an event.
const CHANGE_STREAM_AWAIT_MS = 300;
// Keep the BSON types of returned documents: by default the driver turns
// int32, int64 and double alike into JavaScript numbers, so an int64 of 7
// would print back as an int32.
const EXACT_TYPES = { promoteValues: false };

/**
 * Read the scenario input: namespace, plainCollection, patients (at least
 * three, each with a unique ssn), newPhone, plainDocument, transaction
 * (committed, aborted, newPhone) and changeStream (patient, newSsn, timeoutMS).
 */
function readInput(path) {
  const input = EJSON.parse(readFileSync(path, 'utf8'), { relaxed: false });
  const dot = input.namespace.indexOf('.');
  const database = input.namespace.slice(0, dot);
  const collection = input.namespace.slice(dot + 1);
  return { ...input, database, collection };
}

/**
 * Connect and keep the `compression` list of the proxy's handshake reply,
 * which names the compressors the proxy accepted. The driver's first
 * heartbeat event carries that reply.
 */
async function connect(uri, options = {}) {
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 10000, ...options });
  const handshake = { compression: null };
  client.once('serverHeartbeatSucceeded', (event) => {
    handshake.compression = event.reply.compression ?? [];
  });
  await client.connect();
  return { client, handshake };
}

/** Collect the batch sizes the server returned for one collection's cursors. */
function recordBatches(client, collection) {
  const batches = { getMores: 0, sizes: [] };
  client.on('commandStarted', (event) => {
    if (event.commandName === 'getMore' && event.command.collection === collection) {
      batches.getMores += 1;
    }
  });
  client.on('commandSucceeded', (event) => {
    const cursor = event.reply?.cursor;
    if (cursor?.ns?.endsWith(`.${collection}`)) {
      batches.sizes.push((cursor.firstBatch ?? cursor.nextBatch).length);
    }
  });
  return batches;
}

/** Run a command expected to fail and return the server error, or null when it succeeds. */
async function expectServerError(operation) {
  try {
    await operation();
    return null;
  } catch (error) {
    if (!(error instanceof MongoServerError)) {
      throw error;
    }
    return { code: error.code, codeName: error.codeName, message: error.message };
  }
}

async function runClinicianSteps(db, input, batches) {
  const patients = db.collection(input.collection, EXACT_TYPES);
  const [updated, matched] = input.patients;
  const deleted = input.patients.at(-1);
  const ssns = input.patients.map((patient) => patient.ssn);
  const results = {};

  const inserted = await patients.insertMany(input.patients);
  results.inserted = inserted.insertedCount;

  const update = await patients.updateOne({ ssn: updated.ssn },
                                          { $set: { phone: input.newPhone } });
  results.update = { matched: update.matchedCount, modified: update.modifiedCount };

  results.foundBySsn = await patients.find({ ssn: updated.ssn }).toArray();

  // Read the batch sizes of this cursor only.
  batches.sizes.length = 0;
  batches.getMores = 0;
  const cursor = patients.find({ ssn: { $in: ssns } }).sort({ visits: 1 }).batchSize(BATCH_SIZE);
  const all = await cursor.toArray();
  results.batches = { documents: all, getMores: batches.getMores, sizes: [...batches.sizes] };

  results.aggregate = await patients.aggregate([
    { $match: { ssn: matched.ssn } },
    { $project: { ssn: 1, mrn: 1, conditions: 1, visits: 1 } },
  ]).toArray();

  const removal = await patients.deleteOne({ ssn: deleted.ssn });
  const remaining = await patients.countDocuments({ ssn: deleted.ssn });
  results.delete = { deleted: removal.deletedCount, remaining };

  results.regexError = await expectServerError(
    () => patients.find({ ssn: { $regex: '^900-' } }).toArray());
  return results;
}

async function runPlainSteps(db, input) {
  const plain = db.collection(input.plainCollection, EXACT_TYPES);
  const inserted = await plain.insertOne(input.plainDocument);
  const found = await plain.find({ _id: inserted.insertedId }).toArray();
  return { acknowledged: inserted.acknowledged, found };
}

/**
 * Commit a transaction that inserts a patient and sets its phone, then abort
 * one that inserts another patient. Return what a read outside the
 * transactions finds for each.
 */
async function runTransactionSteps(client, input) {
  const { committed, aborted, newPhone } = input.transaction;
  const patients = client.db(input.database).collection(input.collection, EXACT_TYPES);
  const session = client.startSession();

  try {
    session.startTransaction();
    await patients.insertOne(committed, { session });
    await patients.updateOne({ ssn: committed.ssn }, { $set: { phone: newPhone } }, { session });
    await session.commitTransaction();

    session.startTransaction();
    await patients.insertOne(aborted, { session });
    await session.abortTransaction();
  } finally {
    await session.endSession();
  }

  return {
    committed: await patients.find({ _id: committed._id }).toArray(),
    aborted: await patients.find({ _id: aborted._id }).toArray(),
  };
}

/** Read change events until there are `count` of them or `deadline` (ms since the epoch) passes. */
async function readEvents(stream, events, count, deadline) {
  while (events.length < count && Date.now() < deadline) {
    const event = await stream.tryNext();
    if (event !== null) {
      events.push(event);
    }
  }
}

/**
 * Watch the patient collection as the billing user while the clinician
 * inserts input.changeStream.patient and sets its ssn. Return the events read,
 * at most two, within timeoutMS.
 */
async function runChangeStreamSteps(clinicianDb, input) {
  const { patient, newSsn, timeoutMS } = input.changeStream;
  const { client } = await connect(process.env.BILLING_URI);
  const events = [];

  try {
    const watched = client.db(input.database).collection(input.collection, EXACT_TYPES);
    const pipeline = [{ $match: { 'documentKey._id': patient._id } }];
    const stream = watched.watch(pipeline, {
      fullDocument: 'updateLookup', maxAwaitTimeMS: CHANGE_STREAM_AWAIT_MS,
    });
    try {
      // The driver sends the aggregate that opens the stream on the first
      // read, and the stream sees only writes after that, so read once first.
      const first = await stream.tryNext();
      if (first !== null) {
        events.push(first);
      }

      const patients = clinicianDb.collection(input.collection);
      await patients.insertOne(patient);
      await patients.updateOne({ _id: patient._id }, { $set: { ssn: newSsn } });
      await readEvents(stream, events, 2, Date.now() + timeoutMS);
    } finally {
      await stream.close();
    }
  } finally {
    await client.close();
  }
  return events;
}

async function runBillingSteps(input) {
  const { client } = await connect(process.env.BILLING_URI);
  try {
    const ids = input.patients.map((patient) => patient._id);
    const patients = client.db(input.database).collection(input.collection, EXACT_TYPES);
    return await patients.find({ _id: { $in: ids } }).sort({ visits: 1 }).toArray();
  } finally {
    await client.close();
  }
}

async function main() {
  const input = readInput(process.argv[2]);
  const { client, handshake } = await connect(process.env.CLINICIAN_URI, { monitorCommands: true });
  const results = { client: { name: 'nodejs', version: DRIVER_VERSION } };

  try {
    const db = client.db(input.database);
    const batches = recordBatches(client, input.collection);
    Object.assign(results, await runClinicianSteps(db, input, batches));
    results.plain = await runPlainSteps(db, input);
    results.transaction = await runTransactionSteps(client, input);
    results.changeStream = await runChangeStreamSteps(db, input);
  } finally {
    await client.close();
  }
  results.compression = handshake.compression;
  results.billing = await runBillingSteps(input);

  process.stdout.write(EJSON.stringify(results, { relaxed: false }) + '\n');
}

main().catch((error) => {
  // Print the error's class and message only: no stack, and never the URIs, which contain passwords.
  process.stderr.write(`scenario failed: ${error?.name}: ${error?.message}\n`);
  process.exit(1);
});
