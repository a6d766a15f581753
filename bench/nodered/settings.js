// Headless Node-RED for the fogline peer benchmark: no editor, no admin API, no credentials.
module.exports = {
    uiHost: "127.0.0.1",
    uiPort: parseInt(process.env.FOGLINE_NR_PORT || "1880", 10),
    httpAdminRoot: false,
    httpNodeRoot: false,
    flowFile: "flows.json",
    credentialsFile: false,
    credentialSecret: false,
    flowFilePretty: false,
    disableEditor: true,
    logging: { console: { level: "warn", metrics: false, audit: false } },
    functionGlobalContext: {},
};
