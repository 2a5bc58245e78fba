/** Run a test script's `main`, then print what it saw as one JSON line for tests/test_node.py (with
 * the error when it failed, and exit status 1). */
export async function report(main, saw) {
  try {
    await main();
  } catch (error) {
    saw.error = String(error?.stack ?? error);
    process.exitCode = 1;
  }
  console.log(JSON.stringify(saw));
}
