// The Vercel AI SDK (ai + @ai-sdk/openai-compatible) against a running server's /v1.
// Usage: node ai_sdk.mjs '{"baseURL": ".../v1", "apiKey": "...", "mode": "stream"}'
// Modes: stream (streamText), generate (generateText), tools (streamText with a tool
// executed here, then the model's answer). Prints one JSON object on stdout.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";

const { baseURL, apiKey, mode, prompt = "Hello" } = JSON.parse(process.argv[2]);
const provider = createOpenAICompatible({ name: "streamsvc", baseURL, apiKey });
const model = provider.chatModel("gpt-4o");

async function streamed(options) {
  const result = streamText({ model, ...options });
  const parts = [];
  const errors = [];
  for await (const part of result.fullStream) {
    if (part.type === "text-delta") parts.push(part.text);
    if (part.type === "error") errors.push(String(part.error?.message ?? part.error));
    if (part.type === "tool-call") parts.push({ call: part.toolName, input: part.input });
    if (part.type === "tool-result") parts.push({ result: part.output });
  }
  const response = await result.response;
  const steps = await result.steps;
  return {
    parts,
    errors,
    text: await result.text,
    finishReason: await result.finishReason,
    response: { id: response.id, modelId: response.modelId, timestamp: response.timestamp },
    steps: steps.map((step) => ({ finishReason: step.finishReason, id: step.response.id })),
  };
}

let out;
if (mode === "stream") {
  out = await streamed({ prompt });
} else if (mode === "generate") {
  const result = await generateText({ model, prompt });
  out = {
    text: result.text,
    finishReason: result.finishReason,
    response: { id: result.response.id, modelId: result.response.modelId },
    body: result.response.body,
  };
} else if (mode === "tools") {
  const getWeather = tool({
    description: "The weather in a city.",
    inputSchema: jsonSchema({
      type: "object",
      properties: { city: { type: "string" } },
      required: ["city"],
    }),
    execute: async ({ city }) => ({ city, sky: "sunny" }),
  });
  out = await streamed({ prompt, tools: { get_weather: getWeather }, stopWhen: stepCountIs(2) });
} else {
  throw new Error(`unknown mode ${mode}`);
}
process.stdout.write(JSON.stringify(out));
