'use strict';

// A permission policy for tests, installed into the real permission backend the way a
// Backstage integrator would (a backend module on policyExtensionPoint). The decision is
// controlled by the test through the permission name it asks about:
//
//   test.allow.<anything>            -> ALLOW
//   test.deny.<anything>             -> DENY
//   test.user.<userEntityRef>        -> ALLOW only when the user the request is made for
//                                       (the token's user, or a plugin token's `obo` user)
//                                       is <userEntityRef>, e.g. test.user.user:development/guest
//   test.service                     -> ALLOW only when there is no user (service credentials)
//   anything else                    -> DENY
//
// Every decision is logged as one line "permission-policy: <json>" so that tests can show
// who the permission backend believed it was deciding for.

const { createBackendModule, coreServices } = require('@backstage/backend-plugin-api');
const { policyExtensionPoint } = require('@backstage/plugin-permission-node/alpha');
const { AuthorizeResult } = require('@backstage/plugin-permission-common');

function decide(name, userEntityRef) {
  if (name.startsWith('test.allow.')) return AuthorizeResult.ALLOW;
  if (name.startsWith('test.user.')) {
    return userEntityRef === name.slice('test.user.'.length)
      ? AuthorizeResult.ALLOW
      : AuthorizeResult.DENY;
  }
  if (name === 'test.service') {
    return userEntityRef ? AuthorizeResult.DENY : AuthorizeResult.ALLOW;
  }
  return AuthorizeResult.DENY;
}

class TestPermissionPolicy {
  constructor(logger) {
    this.logger = logger;
  }

  async handle(request, user) {
    const name = request.permission.name;
    const userEntityRef = user?.info?.userEntityRef;
    const result = decide(name, userEntityRef);
    const principal = user?.credentials?.principal;
    this.logger.info(`permission-policy: ${JSON.stringify({
      permission: name,
      user: userEntityRef ?? null,
      ownership: user?.info?.ownershipEntityRefs ?? null,
      actor: principal?.actor?.subject ?? null,
      result,
    })}`);
    return { result };
  }
}

const testPermissionPolicyModule = createBackendModule({
  pluginId: 'permission',
  moduleId: 'stagedoor-test-policy',
  register(reg) {
    reg.registerInit({
      deps: { policy: policyExtensionPoint, logger: coreServices.logger },
      async init({ policy, logger }) {
        policy.setPolicy(new TestPermissionPolicy(logger));
      },
    });
  },
});

module.exports = { testPermissionPolicyModule, decide };
