// A gradwire client in Node.js, generated at run time from the .proto files in protos/
// (with googleapis' google/longrunning protos from the google-proto-files package), as a
// user in another language would write one. tests/test_node_client.py drives it:
//
//   node client.js ADDRESS create                       -> {"model_id"}
//   node client.js ADDRESS forward|forward_backward RUN DATUM_JSON
//                                                       -> {"logprobs", "metrics"} or {"code", "details"}
//   node client.js ADDRESS optim_step RUN LEARNING_RATE -> {"metrics"}
//   node client.js ADDRESS sample TOKENS_JSON MAX_TOKENS -> {"tokens", "logprobs", "stop_reason"}
//
// DATUM_JSON is {"tokens": [...], "targets": [...], "weights": [...]}; tensors travel in
// their binary form (little-endian bytes), as a generated client sends them.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const INCLUDE_DIRS = [path.join(__dirname, "..", "..", "protos"),
                      path.dirname(require.resolve("google-proto-files/package.json"))];
const FILES = ["gradwire/v1/training_service.proto", "gradwire/v1/sampling_service.proto",
               "google/longrunning/operations.proto"];

// The services, for calls; the message types, for the Operation's Any results.
const stubs = grpc.loadPackageDefinition(protoLoader.loadSync(FILES, {
  includeDirs: INCLUDE_DIRS, keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
}));
const types = new protobuf.Root();
types.resolvePath = (origin, target) => {
  for (const dir of INCLUDE_DIRS) {
    const candidate = path.join(dir, target);
    if (require("fs").existsSync(candidate)) return candidate;
  }
  return target;
};
types.loadSync(FILES, { keepCase: true });

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// Waits for a long-running operation (each WaitOperation returns after at most the server's
// long-poll cap, done or not) and unpacks its result into the named message type.
async function result(operations, operation, typeName) {
  let done = operation;
  while (!done.done) {
    done = await call(operations, "WaitOperation", { name: operation.name, timeout: { seconds: 30 } });
  }
  if (done.error) {
    const error = new Error(done.error.message);
    error.code = done.error.code;
    error.details = done.error.message;
    throw error;
  }
  const type = types.lookupType(typeName);
  if (done.response.type_url !== `type.googleapis.com/${typeName}`) {
    throw new Error(`expected ${typeName}, got ${done.response.type_url}`);
  }
  return type.toObject(type.decode(done.response.value), { longs: String, defaults: true });
}

function littleEndian(TypedArray, values) {
  return Buffer.from(new TypedArray(values).buffer);
}

function fromLittleEndian(TypedArray, bytes) {
  const copy = Uint8Array.from(bytes);  // aligned
  return Array.from(new TypedArray(copy.buffer, 0, copy.length / TypedArray.BYTES_PER_ELEMENT));
}

function datum({ tokens, targets, weights }) {
  return {
    model_input: [{ encoded_text: { token_ids: tokens } }],
    loss_fn_inputs: {
      target_tokens: { dense: littleEndian(BigInt64Array, targets.map(BigInt)), dtype: "INT64", shape: [targets.length] },
      weights: { dense: littleEndian(Float32Array, weights), dtype: "FLOAT32", shape: [weights.length] },
    },
  };
}

async function main() {
  const [address, command, ...args] = process.argv.slice(2);
  const v1 = stubs.gradwire.v1;
  const credentials = grpc.credentials.createInsecure();
  const training = new v1.TrainingService(address, credentials);
  const sampling = new v1.SamplingService(address, credentials);
  const operations = new stubs.google.longrunning.Operations(address, credentials);
  let output;
  try {
    if (command === "create") {
      const created = await call(training, "CreateModel",
                                 { base_model: "tiny-random", lora_config: { rank: 4, seed: 0 } });
      output = { model_id: created.model_id };
    } else if (command === "forward" || command === "forward_backward") {
      const [modelId, datumJson] = args;
      const method = command === "forward" ? "Forward" : "ForwardBackward";
      const operation = await call(training, method, { model_id: modelId, loss_fn: "cross_entropy",
                                                      data: [datum(JSON.parse(datumJson))] });
      const forward = await result(operations, operation, "gradwire.v1.ForwardBackwardOutput");
      const logprobs = forward.loss_fn_outputs[0].fields.logprobs;
      output = { logprobs: fromLittleEndian(Float32Array, logprobs.data), metrics: forward.metrics };
    } else if (command === "optim_step") {
      const [modelId, learningRate] = args;
      const operation = await call(training, "OptimStep",
                                   { model_id: modelId, adam_params: { learning_rate: Number(learningRate) } });
      output = { metrics: (await result(operations, operation, "gradwire.v1.OptimStepResponse")).metrics };
    } else if (command === "sample") {
      const [tokensJson, maxTokens] = args;
      const operation = await call(sampling, "Sample", {
        base_model: "tiny-random", prompt: [{ encoded_text: { token_ids: JSON.parse(tokensJson) } }],
        num_samples: 1, sampling_params: { max_tokens: Number(maxTokens), temperature: 0 },
      });
      const [sequence] = (await result(operations, operation, "gradwire.v1.SampleResponse")).sequences;
      output = { tokens: fromLittleEndian(Int32Array, sequence.tokens),
                 logprobs: fromLittleEndian(Float32Array, sequence.logprobs),
                 stop_reason: types.lookupEnum("gradwire.v1.StopReason").valuesById[sequence.stop_reason] };
    } else {
      throw new Error(`unknown command ${command}`);
    }
  } catch (error) {
    if (error.code === undefined) throw error;
    output = { code: error.code, details: error.details };
  }
  process.stdout.write(JSON.stringify(output) + "\n");
  for (const client of [training, sampling, operations]) client.close();
}

main().catch((error) => {
  process.stderr.write(`${error.stack}\n`);
  process.exit(1);
});
