// The client scenario of tests/e2e/test_mongosh.py, run by mongosh.
//
// Usage: mongosh CLINICIAN_URI --quiet --norc --file scenario.mongosh.js
//
// mongosh connects as the clinician with the URI on its command line (which
// may set compressors=...). The environment names the rest:
//   SCENARIO_INPUT  canonical Extended JSON written by the Python test, with
//                   namespace, plainCollection, patients (at least three, each
//                   with a unique ssn), newPhone, plainDocument, transaction
//                   (committed, aborted, newPhone) and changeStream (patient,
//                   newSsn, timeoutMS)
//   BILLING_URI     the proxy, logged in as the billing user
//
// The script prints one canonical Extended JSON document with what each step
// returned, in the shape tests/clients/scenario.mjs prints, except that
// `batches` has no getMore count and `compression` lists the compressor of
// each pooled connection. It checks nothing itself. An unexpected error ends
// mongosh with a non-zero status.

const fs = require('fs');

const BATCH_SIZE = 2;
// How long one getMore on the change stream waits for an event.
const CHANGE_STREAM_AWAIT_MS = 300;
// Keep the BSON types of returned documents: by default a double with an
// integral value reads back as a JavaScript number and prints as an int32.
const EXACT_TYPES = { promoteValues: false };

function readInput() {
  const text = fs.readFileSync(process.env.SCENARIO_INPUT, 'utf8');
  const input = EJSON.parse(text, { relaxed: false });
  const dot = input.namespace.indexOf('.');
  const database = input.namespace.slice(0, dot);
  const collection = input.namespace.slice(dot + 1);
  return { ...input, database, collection };
}

// The compressor of each pooled connection of this shell, null where the
// connection negotiated none. mongosh has no public API for it, so this reads
// the driver's connection pool. NOTE: this path into the Node.js driver's
// internals is checked for mongosh 2.12.0 (driver 7.9.1) only.
function connectionCompressors(mongo) {
  const compressors = [];
  const servers = mongo._serviceProvider.mongoClient.topology.s.servers;
  for (const server of servers.values()) {
    for (const connection of server.pool.connections) {
      compressors.push(connection.description.compressor ?? null);
    }
  }
  return compressors;
}

// Read a cursor to the end and record the size of each batch the server sent.
// objsLeftInBatch() is 0 exactly when the next document needs a getMore, and
// just after the first document of a batch it is the batch size minus one.
function readInBatches(cursor) {
  const documents = [];
  const sizes = [];
  let left = 0;
  while (cursor.hasNext()) {
    documents.push(cursor.next());
    if (left === 0) {
      sizes.push(cursor.objsLeftInBatch() + 1);
    }
    left = cursor.objsLeftInBatch();
  }
  return { documents, sizes };
}

function serverError(operation) {
  try {
    operation();
    return null;
  } catch (error) {
    if (typeof error.code !== 'number') {
      throw error;
    }
    return { code: error.code, codeName: error.codeName, message: error.message };
  }
}

function runClinicianSteps(db, input) {
  const patients = db.getCollection(input.collection);
  const [updated, matched] = input.patients;
  const deleted = input.patients.at(-1);
  const ssns = input.patients.map((patient) => patient.ssn);
  const results = {};

  results.inserted = Object.keys(patients.insertMany(input.patients).insertedIds).length;

  const update = patients.updateOne({ ssn: updated.ssn }, { $set: { phone: input.newPhone } });
  results.update = { matched: update.matchedCount, modified: update.modifiedCount };

  results.foundBySsn = patients.find({ ssn: updated.ssn }, {}, EXACT_TYPES).toArray();

  const cursor = patients.find({ ssn: { $in: ssns } }, {}, EXACT_TYPES);
  results.batches = readInBatches(cursor.sort({ visits: 1 }).batchSize(BATCH_SIZE));

  results.aggregate = patients.aggregate([
    { $match: { ssn: matched.ssn } },
    { $project: { ssn: 1, mrn: 1, conditions: 1, visits: 1 } },
  ], EXACT_TYPES).toArray();

  const removal = patients.deleteOne({ ssn: deleted.ssn });
  const remaining = patients.countDocuments({ ssn: deleted.ssn });
  results.delete = { deleted: removal.deletedCount, remaining };

  results.regexError = serverError(() => patients.find({ ssn: { $regex: '^900-' } }).toArray());
  return results;
}

function runPlainSteps(db, input) {
  const plain = db.getCollection(input.plainCollection);
  const inserted = plain.insertOne(input.plainDocument);
  const found = plain.find({ _id: inserted.insertedId }, {}, EXACT_TYPES).toArray();
  return { acknowledged: inserted.acknowledged, found };
}

// Commit a transaction that inserts a patient and sets its phone, then abort
// one that inserts another patient. Return what a read outside the
// transactions finds for each.
function runTransactionSteps(clinicDb, input) {
  const { committed, aborted, newPhone } = input.transaction;
  const session = clinicDb.getMongo().startSession();
  const inSession = session.getDatabase(input.database).getCollection(input.collection);

  try {
    session.startTransaction();
    inSession.insertOne(committed);
    inSession.updateOne({ ssn: committed.ssn }, { $set: { phone: newPhone } });
    session.commitTransaction();

    session.startTransaction();
    inSession.insertOne(aborted);
    session.abortTransaction();
  } finally {
    session.endSession();
  }

  const patients = clinicDb.getCollection(input.collection);
  return {
    committed: patients.find({ _id: committed._id }, {}, EXACT_TYPES).toArray(),
    aborted: patients.find({ _id: aborted._id }, {}, EXACT_TYPES).toArray(),
  };
}

// Watch the patient collection as the billing user while the clinician
// inserts input.changeStream.patient and sets its ssn. Return the events
// read, at most two, within timeoutMS.
function runChangeStreamSteps(clinicDb, input) {
  const { patient, newSsn, timeoutMS } = input.changeStream;
  const billing = new Mongo(process.env.BILLING_URI);
  const events = [];

  try {
    // mongosh's watch() reads once before it returns, which sends the
    // aggregate that opens the stream, so the writes below come after it.
    const watched = billing.getDB(input.database).getCollection(input.collection);
    const pipeline = [{ $match: { 'documentKey._id': patient._id } }];
    const stream = watched.watch(pipeline, {
      fullDocument: 'updateLookup', maxAwaitTimeMS: CHANGE_STREAM_AWAIT_MS,
    });
    try {
      const patients = clinicDb.getCollection(input.collection);
      patients.insertOne(patient);
      patients.updateOne({ _id: patient._id }, { $set: { ssn: newSsn } });

      const deadline = Date.now() + timeoutMS;
      while (events.length < 2 && Date.now() < deadline) {
        const event = stream.tryNext();
        if (event !== null) {
          events.push(event);
        }
      }
    } finally {
      stream.close();
    }
  } finally {
    billing.close();
  }
  return events;
}

function runBillingSteps(input) {
  const billing = new Mongo(process.env.BILLING_URI);
  try {
    const ids = input.patients.map((patient) => patient._id);
    const patients = billing.getDB(input.database).getCollection(input.collection);
    // Read into a variable first: mongosh runs `return promise` inside try
    // without waiting for it, so `finally` would close the client too early.
    const cursor = patients.find({ _id: { $in: ids } }, {}, EXACT_TYPES).sort({ visits: 1 });
    const documents = cursor.toArray();
    return documents;
  } finally {
    billing.close();
  }
}

function main() {
  const input = readInput();
  const clinicDb = db.getSiblingDB(input.database);
  const results = { client: { name: 'mongosh', version: version() } };

  Object.assign(results, runClinicianSteps(clinicDb, input));
  results.plain = runPlainSteps(clinicDb, input);
  results.transaction = runTransactionSteps(clinicDb, input);
  results.changeStream = runChangeStreamSteps(clinicDb, input);
  results.compression = connectionCompressors(db.getMongo());
  results.billing = runBillingSteps(input);

  print(EJSON.stringify(results, { relaxed: false }));
}

main();
