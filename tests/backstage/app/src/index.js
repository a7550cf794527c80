'use strict';

// Backend entry point: a real Backstage backend (new backend system).
const { createBackend } = require('@backstage/backend-defaults');
const { insightsPlugin } = require('./plugins/insights');
const { devtokensPlugin } = require('./plugins/devtokens');
const { whoamiPlugin } = require('./plugins/whoami');
const { testPermissionPolicyModule } = require('./plugins/permissionPolicy');

const backend = createBackend();

// Auth backend + guest provider, so that a real user token can be obtained:
//   POST|GET /api/auth/guest/refresh  ->  .backstageIdentity.token
backend.add(require('@backstage/plugin-auth-backend'));
backend.add(require('@backstage/plugin-auth-backend-module-guest-provider'));

backend.add(insightsPlugin);

// The real permission backend (POST /api/permission/authorize) with a policy that tests
// steer through the permission name (see plugins/permissionPolicy.js).
backend.add(require('@backstage/plugin-permission-backend'));
backend.add(testPermissionPolicyModule);

// Test helper: GET /api/whoami/whoami answers with the caller's principal.
backend.add(whoamiPlugin);

// Reference-only helper that mints plugin-to-plugin tokens (see file header).
if (process.env.REFERENCE_DEVTOKENS !== '0') {
  backend.add(devtokensPlugin);
}

backend.start();
